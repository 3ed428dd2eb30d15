"""Where a model's data came from, saved with every checkpoint: what generation and export need to read and
write its text and images (the tokenizer, the σ-VAE by content hash, the latent statistics).

Paths are hints only: the σ-VAE is found by its sha256 wherever it is now, so a checkpoint keeps working
after the dataset and σ-VAE folders move. The trainer keeps a copy of the σ-VAE next to its checkpoints
(`<save>/sigma_vae-<sha256[:16]>.pt`, a hard link when the file system allows), so the save directory is
self-sufficient. Checkpoints from before this record carry an untyped `extra` dict in run_config.json
(`tokenizer`, `sigma_vae` as an absolute path, `data`): they load as a Provenance without a hash.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, fields

from latentlm_mcore.data.tokenizer import sha256_file

SIGMA_VAE_PREFIX = "sigma_vae-"


@dataclass
class Provenance:
    tokenizer: str | None = None  # tokenizer spec (data/tokenizer.py load_tokenizer)
    sigma_vae_sha256: str | None = None  # the σ-VAE file's content hash: how it is found again
    sigma_vae_path: str | None = None  # where it was when the run started (a hint)
    latent_stats: dict | None = None  # the scaling the dataset's latents were stored with (LatentStats.to_dict)
    dataset: str | None = None  # the dataset folder as given to the run (a hint)
    legacy: bool = False  # read from a pre-provenance checkpoint's `extra` dict

    @classmethod
    def from_manifest(cls, manifest: dict, dataset: str | None) -> "Provenance":
        vae = manifest.get("vae") or {}
        return cls(tokenizer=manifest["tokenizer"]["spec"], sigma_vae_sha256=vae.get("sha256"),
                   sigma_vae_path=vae.get("path"), latent_stats=manifest.get("latent_stats"), dataset=dataset)

    @classmethod
    def from_dict(cls, d: dict) -> "Provenance":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"provenance has unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_legacy_extra(cls, extra: dict) -> "Provenance":
        return cls(tokenizer=extra.get("tokenizer"), sigma_vae_path=extra.get("sigma_vae"),
                   dataset=extra.get("data"), legacy=True)

    def to_dict(self) -> dict:
        return asdict(self)


def keep_sigma_vae_beside(save_dir: str, provenance: Provenance) -> None:
    """Put the run's σ-VAE into `save_dir` (once; rank 0 only) so its checkpoints find it by hash later."""
    if not provenance.sigma_vae_sha256 or not provenance.sigma_vae_path:
        return
    target = os.path.join(save_dir, f"{SIGMA_VAE_PREFIX}{provenance.sigma_vae_sha256[:16]}.pt")
    if os.path.exists(target) or not os.path.isfile(provenance.sigma_vae_path):
        return
    tmp = target + ".tmp"
    try:
        os.link(provenance.sigma_vae_path, tmp)
    except OSError:  # another file system: copy
        shutil.copyfile(provenance.sigma_vae_path, tmp)
    os.replace(tmp, target)


def resolve_sigma_vae(provenance: Provenance, checkpoint_dir: str, explicit: str | None = None) -> str | None:
    """The σ-VAE file for a checkpoint: `explicit` (--sigma-vae) if given; else, when the hash is known, the
    first file with that hash among the recorded path, the `sigma_vae-*.pt` next to the checkpoint (its
    folder and the save directory above it) and the dataset manifest's path; a legacy record's path as it
    is. None when the checkpoint names no σ-VAE. Raises FileNotFoundError naming where it looked."""
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"σ-VAE {explicit}: no such file")
        return explicit
    if provenance.sigma_vae_sha256 is None:
        if provenance.sigma_vae_path and not os.path.isfile(provenance.sigma_vae_path):
            raise FileNotFoundError(f"{checkpoint_dir}: its σ-VAE {provenance.sigma_vae_path} is gone (a checkpoint "
                                    f"from before provenance records no hash to find it by); pass --sigma-vae")
        return provenance.sigma_vae_path
    candidates = [provenance.sigma_vae_path]
    for folder in (checkpoint_dir, os.path.dirname(os.path.normpath(checkpoint_dir))):
        if os.path.isdir(folder):
            candidates += sorted(os.path.join(folder, f) for f in os.listdir(folder)
                                 if f.startswith(SIGMA_VAE_PREFIX) and f.endswith(".pt"))
    if provenance.dataset:
        candidates.append(_manifest_vae_path(provenance.dataset))
    looked = [c for c in candidates if c]
    for path in looked:
        if os.path.isfile(path) and sha256_file(path) == provenance.sigma_vae_sha256:
            return path
    raise FileNotFoundError(f"{checkpoint_dir}: no σ-VAE with sha256 {provenance.sigma_vae_sha256[:16]}... "
                            f"(looked at {looked or 'nothing'}); pass --sigma-vae")


def _manifest_vae_path(dataset: str) -> str | None:
    import json

    path = os.path.join(dataset, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return (json.load(f).get("vae") or {}).get("path")
