"""The dataset's provenance in run_config.json: typed, found again by hash after folders move, and the
untyped `extra` dict of older checkpoints still read."""
import json
import shutil

import pytest

from latentlm_mcore.config import LatentLMConfig, ModelConfig
from latentlm_mcore.data.tokenizer import sha256_file
from latentlm_mcore.training.checkpoint import load_run_config, save_run_config
from latentlm_mcore.training.provenance import Provenance, keep_sigma_vae_beside, resolve_sigma_vae

CFG = LatentLMConfig(name="t", model=ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=1,
                                                 vocab_size=16, seq_length=8, latent_dim=4, head_layers=1))


def dataset_and_vae(tmp_path):
    vae = tmp_path / "vaes" / "tiny.pt"
    vae.parent.mkdir()
    vae.write_bytes(b"sigma-vae weights")
    manifest = {"tokenizer": {"spec": "cl100k_base:1000"}, "vae": {"path": str(vae), "sha256": sha256_file(vae)},
                "latent_stats": {"mean": [0.5], "std": [2.0]}}
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text(json.dumps(manifest))
    return vae, Provenance.from_manifest(manifest, str(tmp_path / "dataset"))


def test_provenance_round_trips_through_run_config(tmp_path):
    _, provenance = dataset_and_vae(tmp_path)
    save_run_config(str(tmp_path), CFG, provenance)
    cfg, loaded = load_run_config(str(tmp_path))
    assert cfg == CFG and loaded == provenance and not loaded.legacy
    assert loaded.latent_stats == {"mean": [0.5], "std": [2.0]} and loaded.tokenizer == "cl100k_base:1000"


def test_sigma_vae_found_by_hash_beside_the_checkpoint_after_folders_move(tmp_path):
    vae, provenance = dataset_and_vae(tmp_path)
    save = tmp_path / "run"
    (save / "iter_0000001").mkdir(parents=True)
    keep_sigma_vae_beside(str(save), provenance)
    checkpoint = str(save / "iter_0000001")
    assert resolve_sigma_vae(provenance, checkpoint) == str(vae)  # still where it was
    shutil.move(str(tmp_path / "vaes"), str(tmp_path / "vaes_moved"))
    shutil.move(str(tmp_path / "dataset"), str(tmp_path / "dataset_moved"))
    found = resolve_sigma_vae(provenance, checkpoint)
    assert found.startswith(str(save)) and sha256_file(found) == provenance.sigma_vae_sha256
    explicit = str(tmp_path / "vaes_moved" / "tiny.pt")
    assert resolve_sigma_vae(provenance, checkpoint, explicit=explicit) == explicit


def test_dataset_manifest_is_a_place_to_look_and_a_wrong_file_is_refused(tmp_path):
    vae, provenance = dataset_and_vae(tmp_path)
    provenance.sigma_vae_path = str(tmp_path / "old_place.pt")  # the run saw it elsewhere; the manifest knows
    assert resolve_sigma_vae(provenance, str(tmp_path / "ckpt")) == str(vae)
    vae.write_bytes(b"other weights, same name")
    with pytest.raises(FileNotFoundError, match=r"no σ-VAE with sha256 .*pass --sigma-vae"):
        resolve_sigma_vae(provenance, str(tmp_path / "ckpt"))


def test_checkpoint_with_the_old_extra_dict_still_loads(tmp_path):
    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"w")
    save_run_config(str(tmp_path), CFG)
    payload = json.loads((tmp_path / "run_config.json").read_text())
    del payload["provenance"]
    payload["extra"] = {"data": "/old/dataset", "tokenizer": "cl100k_base", "sigma_vae": str(vae)}
    (tmp_path / "run_config.json").write_text(json.dumps(payload))
    _, provenance = load_run_config(str(tmp_path))
    assert provenance == Provenance(tokenizer="cl100k_base", sigma_vae_path=str(vae), dataset="/old/dataset", legacy=True)
    assert resolve_sigma_vae(provenance, str(tmp_path)) == str(vae)
    vae.unlink()
    with pytest.raises(FileNotFoundError, match="records no hash.*pass --sigma-vae"):
        resolve_sigma_vae(provenance, str(tmp_path))
