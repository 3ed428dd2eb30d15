"""The training data stream: a weighted mixture of MDS datasets, read as one global sequence of
documents (`data/loader/packed.py` packs it into the sequences data-parallel ranks take by index).

`StreamMixture` is mosaicml-streaming's `StreamingDataset` over one `Stream` per source. The mixture
ratio (default text : pairs : interleaved = 2 : 1 : 1) is a share of *tokens* by default: each source's
streaming proportion is its ratio divided by its mean tokens per document (from the manifest), so short
pair documents are drawn more often (`document_weights`; `unit="documents"` counts documents instead).
Streaming draws each epoch's resampled, shuffled sample order; we read that order as one global
sequence of documents (global index g = epoch * epoch_size + position) and read samples by random access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from latentlm_mcore.data import schema
from latentlm_mcore.data.schema import SpecialIds
from latentlm_mcore.data.streaming_compat import import_streaming

DEFAULT_PROPORTIONS = {"text": 2.0, "pair": 1.0, "interleaved": 1.0}
MIXTURE_UNITS = ("tokens", "documents")


@dataclass
class MixtureConfig:
    # Output folder of tools/preprocess_interleaved.py (one subfolder per source it has), or a list of them:
    # text and image data may come from different runs if they used the same tokenizer and σ-VAE.
    dataset_root: str | list[str]
    # Node-local folder that streaming copies shards of a *remote* dataset (s3://, gs://, ...) into; the same
    # path on every rank of a node. Datasets on a filesystem (local disk, NFS, Lustre) are read in place:
    # streaming then registers no cache directory in shared memory, so a run that was SIGKILLed leaves
    # nothing that makes the restarted run fail with "Reused local directory".
    cache_dir: str | None = None
    proportions: dict = field(default_factory=lambda: dict(DEFAULT_PROPORTIONS))
    unit: str = "tokens"  # what `proportions` share out: "tokens" (default) or "documents"
    seed: int = 1234  # shuffle, resampling, condition dropout, pair direction, σ-VAE sample and noise seeds
    # Samples are shuffled within blocks of this many (streaming's default for one canonical node). A block
    # spans many shards of every stream, which keeps the mix steady from one batch to the next.
    shuffle_block_size: int = 4_000_000
    cache_limit: str | None = None  # e.g. "500gb": streaming evicts the coldest shards beyond it


def parse_proportions(text: str) -> dict:
    """"text=2,pair=1,interleaved=1" -> {"text": 2.0, ...}"""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"proportions: {item!r} is not name=number") from None
    return out


def source_statistics(manifests: list[dict]) -> dict:
    """{source: {"documents", "tokens", "latent_tokens"}} summed over the manifests that hold it."""
    out = {}
    for m in manifests:
        for source in m["sources"]:
            row = out.setdefault(source, {"documents": 0, "tokens": 0, "latent_tokens": 0})
            row["documents"] += m["documents_written"].get(source, 0)
            row["tokens"] += m["tokens_written"].get(source, 0)
            row["latent_tokens"] += m.get("latent_tokens_written", {}).get(source, 0)
    return out


def document_weights(proportions: dict, statistics: dict, unit: str = "tokens") -> dict:
    """Streaming's per-source proportions (documents) that give `proportions` in `unit`, normalised to sum 1.
    Tokens: weight_s ∝ proportion_s / mean tokens per document of s. The one formula the loader and
    tools/plan_run.py use."""
    if unit not in MIXTURE_UNITS:
        raise ValueError(f"mixture unit {unit!r} is not one of {MIXTURE_UNITS}")
    weights = {}
    for source, p in proportions.items():
        if p <= 0:
            continue
        if source not in statistics or not statistics[source]["documents"]:
            raise ValueError(f"mixture: no documents of source {source!r}; present: {sorted(statistics)}")
        row = statistics[source]
        weights[source] = p / (row["tokens"] / row["documents"]) if unit == "tokens" else p
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def expected_token_shares(weights: dict, statistics: dict) -> dict:
    """Token share of each source when documents are drawn with `weights` (at the manifest's mean lengths)."""
    tokens = {s: w * statistics[s]["tokens"] / statistics[s]["documents"] for s, w in weights.items()}
    total = sum(tokens.values())
    return {s: t / total for s, t in tokens.items()}


def expected_latent_fraction(weights: dict, statistics: dict) -> float:
    """Share of all tokens that are latents (≈ positions whose next token is a latent) under `weights`."""
    tokens = sum(w * statistics[s]["tokens"] / statistics[s]["documents"] for s, w in weights.items())
    latents = sum(w * statistics[s]["latent_tokens"] / statistics[s]["documents"] for s, w in weights.items())
    return latents / tokens


class StreamMixture:
    """Global document order of the mixture, and random access to document g (unscaled μ latents)."""

    def __init__(self, cfg: MixtureConfig):
        streaming = import_streaming()
        self.cfg = cfg
        roots = [cfg.dataset_root] if isinstance(cfg.dataset_root, str) else list(cfg.dataset_root)
        root_of, manifests = {}, [schema.read_manifest(r) for r in roots]
        for root, manifest in zip(roots, manifests):
            for source in manifest["sources"]:
                if source in root_of:
                    raise ValueError(f"source {source!r} is in both {root_of[source]} and {root}")
                root_of[source] = root
        wanted = [s for s in cfg.proportions if cfg.proportions[s] > 0]
        missing = [s for s in wanted if s not in root_of]
        if missing:
            raise ValueError(f"no documents of source(s) {missing} in {roots}; present: {sorted(root_of)}")
        self.manifest = _common_manifest(manifests, roots)
        self.statistics = source_statistics(manifests)
        self.weights = document_weights(cfg.proportions, self.statistics, cfg.unit)
        self.sources = list(self.weights)
        streams = [_stream(streaming, root_of[s], s, cfg.cache_dir, self.weights[s]) for s in self.sources]
        # batch_size / num_canonical_nodes only shape streaming's own partition, which we read for a world
        # of one rank; fixing them keeps the global order independent of the machine.
        self.dataset = streaming.StreamingDataset(
            streams=streams, shuffle=True, shuffle_seed=cfg.seed, shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=1, batch_size=1, predownload=1, cache_limit=cfg.cache_limit)
        self.epoch_size = int(self.dataset.epoch_size)
        self._epoch, self._order = -1, None
        stats = self.manifest["latent_stats"]
        dim = int(self.manifest["latent_dim"])
        self.latent_mean = np.asarray(stats["mean"] if stats else np.zeros(dim), np.float32)
        self.latent_std = np.asarray(stats["std"] if stats else np.ones(dim), np.float32)
        c_sigma = (self.manifest.get("vae") or {}).get("c_sigma")  # None: preprocessed before it was recorded
        self.c_sigma = None if c_sigma is None else float(c_sigma)
        self.ids = SpecialIds.from_manifest(self.manifest)
        self.latent_dim = dim
        # each document's length and image runs (preprocessing's layout index), where the dataset has one
        from latentlm_mcore.data.prep.merge import read_layout

        self.layouts = {s: read_layout(os.path.join(root_of[s], s)) if "://" not in root_of[s] else None
                        for s in self.sources}
        tokens_per_image = self.manifest.get("tokens_per_image")  # None: speech, runs of any length
        self.tokens_per_image = None if tokens_per_image is None else int(tokens_per_image)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids of one epoch in streaming's resampled, shuffled order (cached for the current epoch)."""
        if epoch != self._epoch:
            from streaming.base.batching import generate_work
            from streaming.base.world import World

            work = generate_work("random", self.dataset, World(num_nodes=1, ranks_per_node=1, workers_per_rank=1,
                                                               worker=0), epoch, 0)
            order = work.reshape(-1)
            self._epoch, self._order = epoch, order[order >= 0]
        return self._order

    def sample_id(self, g: int) -> int:
        epoch, pos = divmod(g, self.epoch_size)
        return int(self.epoch_order(epoch)[pos])

    def source_of(self, sample_id: int) -> str:
        stream = int(np.searchsorted(self.dataset.sample_offset_per_stream, sample_id, side="right")) - 1
        return self.sources[stream]

    def document(self, g: int) -> dict:
        return self.dataset[self.sample_id(g)]

    def stored_shape(self, g: int):
        """(source, length, image runs [r, 2]) of document g as stored, from the layout index; None without one."""
        sample_id = self.sample_id(g)
        stream = int(np.searchsorted(self.dataset.sample_offset_per_stream, sample_id, side="right")) - 1
        layout = self.layouts[self.sources[stream]]
        if layout is None:
            return None
        lengths, offsets, runs = layout
        i = sample_id - int(self.dataset.sample_offset_per_stream[stream])
        return self.sources[stream], int(lengths[i]), np.asarray(runs[offsets[i]:offsets[i + 1]])


def _common_manifest(manifests: list[dict], roots: list[str]) -> dict:
    """The one manifest the mixture follows; datasets that would mix incompatible ids or latents are refused."""
    first = manifests[0]
    with_images = [m for m in manifests if m["latent_stats"] is not None]
    for m, root in zip(manifests, roots):
        if m["tokenizer"] != first["tokenizer"]:
            raise ValueError(f"{root} was tokenized with {m['tokenizer']['name']} ({m['tokenizer']['sha256'][:12]}), "
                             f"{roots[0]} with {first['tokenizer']['name']} ({first['tokenizer']['sha256'][:12]})")
        if m["latent_dim"] != first["latent_dim"] or (m["latent_stats"] and m["vae"] != with_images[0]["vae"]):
            raise ValueError(f"{root} was encoded with another σ-VAE than the other datasets")
        if m["latent_stats"] and m["latent_stats"] != with_images[0]["latent_stats"]:
            raise ValueError(f"{root} scales latents differently from the other datasets; store the latent "
                             f"statistics in the σ-VAE checkpoint so that every run uses the same")
    return dict(first, latent_stats=with_images[0]["latent_stats"] if with_images else None)


def _stream(streaming, root: str, source: str, cache_dir: str | None, proportion: float):
    if "://" not in root:
        return streaming.Stream(local=os.path.join(root, source), proportion=proportion)
    if cache_dir is None:
        raise ValueError(f"{root} is remote: give a node-local cache_dir to copy its shards into")
    return streaming.Stream(remote=f"{root.rstrip('/')}/{source}", local=os.path.join(cache_dir, source),
                            proportion=proportion)
