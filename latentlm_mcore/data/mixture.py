"""The training data stream: a weighted mixture of MDS datasets, split over data-parallel ranks, packed.

`StreamMixture` is mosaicml-streaming's `StreamingDataset` over one `Stream` per source with
proportions (default text : pairs : interleaved = 2 : 1 : 1). Streaming draws each epoch's resampled,
shuffled sample order; we read that order as one global sequence of documents (global index
g = epoch * epoch_size + position) and read samples by random access.

`PackedLoader` gives data-parallel rank r of W the documents g = frontier + r, frontier + r + W, ...
and packs them. We split over ranks ourselves instead of letting streaming do it because
- streaming detects ranks from RANK / WORLD_SIZE, which count tensor- and pipeline-parallel peers too;
  our split uses only (dp_rank, dp_world_size), so TP/PP peers of a DP rank read identical documents
  without communicating;
- resuming at another DP size must neither repeat nor skip a document even though each rank's packer
  stops in the middle of a document. The checkpoint therefore keeps every rank's position; merged, they
  give the first document no rank has touched (the new frontier) plus the short list of documents below
  it that are unread or half packed, which the new layout takes first.

Checkpointing: each DP rank's `state_dict()` is small; the trainer stores the list over DP ranks
(TP/PP peers hold identical states) and passes that list to `load_state_dict` at any DP size.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from latentlm_mcore.data import schema
from latentlm_mcore.data.packing import PackableDocument, SpecialIds, collate, pack_documents
from latentlm_mcore.data.streaming_compat import import_streaming

DEFAULT_PROPORTIONS = {"text": 2.0, "pair": 1.0, "interleaved": 1.0}
STATE_VERSION = 1


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
    seed: int = 1234  # shuffle, resampling, condition dropout and noise seeds derive from it
    # Samples are shuffled within blocks of this many (streaming's default for one canonical node). A block
    # spans many shards of every stream, which keeps the 2:1:1 mix steady from one batch to the next.
    shuffle_block_size: int = 4_000_000
    cache_limit: str | None = None  # e.g. "500gb": streaming evicts the coldest shards beyond it


class StreamMixture:
    """Global document order of the mixture, and random access to document g (unscaled latents)."""

    def __init__(self, cfg: MixtureConfig):
        streaming = import_streaming()
        self.cfg = cfg
        self.sources = [s for s in cfg.proportions if cfg.proportions[s] > 0]
        roots = [cfg.dataset_root] if isinstance(cfg.dataset_root, str) else list(cfg.dataset_root)
        root_of, manifests = {}, [schema.read_manifest(r) for r in roots]
        for root, manifest in zip(roots, manifests):
            for source in manifest["sources"]:
                if source in root_of:
                    raise ValueError(f"source {source!r} is in both {root_of[source]} and {root}")
                root_of[source] = root
        missing = [s for s in self.sources if s not in root_of]
        if missing:
            raise ValueError(f"no documents of source(s) {missing} in {roots}; present: {sorted(root_of)}")
        self.manifest = _common_manifest(manifests, roots)
        streams = [_stream(streaming, root_of[s], s, cfg.cache_dir, float(cfg.proportions[s])) for s in self.sources]
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
        self.ids = SpecialIds.from_manifest(self.manifest)
        self.latent_dim = int(self.manifest["latent_dim"])

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


def _queue(frontier: int, carry: list, rank: int, world: int, skip: int = 0):
    """This rank's documents from queue position `skip` on: its share of `carry` (documents below the
    frontier, with start offsets), then frontier + rank, frontier + rank + world, ...
    Yields (global index, start offset); increasing in the global index."""
    share = carry[rank::world]
    for g, off in share[skip:]:
        yield g, off
    g = frontier + rank + max(0, skip - len(share)) * world
    while True:
        yield g, 0
        g += world


class DocumentReader(torch.utils.data.Dataset):
    """Global index -> PackableDocument (scaled latents, condition dropout applied). Runs in loader workers."""

    def __init__(self, mixture: StreamMixture, condition_dropout: float):
        self.mixture = mixture
        self.condition_dropout = condition_dropout

    def __getitem__(self, g: int) -> PackableDocument:
        m, ids = self.mixture, self.mixture.ids
        sample = m.document(g)
        tokens = np.asarray(sample["tokens"], np.int32)
        latents = (schema.decode_latents(sample["latents"], m.latent_dim).astype(np.float32) - m.latent_mean) / m.latent_std
        if sample["source"] == "pair" and self.condition_dropout > 0:
            # Classifier-free guidance: sometimes the image is generated with no caption to condition on.
            u = np.random.default_rng([m.cfg.seed, 1, g]).random()
            if u < self.condition_dropout:
                keep = np.isin(tokens, [ids.bod, ids.eod, ids.latent, ids.end_of_document])
                tokens = tokens[keep]
        doc = PackableDocument(index=g, source=sample["source"], tokens=tokens, latents=latents)
        doc.mark_runs(ids)
        return doc


class _Indices(torch.utils.data.Sampler):
    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)


@dataclass
class LoaderConfig:
    seq_length: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_world_size: int = 1
    condition_dropout: float = 0.1  # probability of dropping a pair's caption
    num_workers: int = 0  # document-reading processes per rank
    prefetch_factor: int = 8


class PackedLoader:
    """Iterates micro-batches (dicts of BATCH_FIELDS tensors) for one data-parallel rank, forever."""

    def __init__(self, mixture: StreamMixture, cfg: LoaderConfig):
        if not 0 <= cfg.dp_rank < cfg.dp_world_size:
            raise ValueError(f"dp_rank {cfg.dp_rank} not in [0, {cfg.dp_world_size})")
        self.mixture, self.cfg = mixture, cfg
        self.skipped = Counter()  # documents dropped by the packer, by reason
        self._frontier, self._carry = 0, []
        self._consumed, self._offset = 0, 0  # position in this rank's queue after the last yielded batch

    # ---------------------------------------------------------------------------------- iteration
    def sequences(self):
        """Packed sequences one by one as (PackedSequence, position after it); the packer's bookkeeping
        (`pieces`, `skipped`) rides along for logging and tests."""
        cfg = self.cfg
        queue = _queue(self._frontier, self._carry, cfg.dp_rank, cfg.dp_world_size, skip=self._consumed)
        for_reader, for_starts = itertools.tee(queue)
        # Workers read ahead; the DataLoader hands documents back in sampler order.
        reader = torch.utils.data.DataLoader(
            DocumentReader(self.mixture, cfg.condition_dropout), sampler=_Indices(g for g, _ in for_reader),
            batch_size=None, num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None)
        documents = zip(reader, (start for _, start in for_starts))

        def next_document(_pos: int) -> PackableDocument:
            doc, doc.start = next(documents)
            return doc

        position = (self._consumed, self._offset, None)
        while True:
            seq, position = pack_documents(next_document, cfg.seq_length, self.mixture.latent_dim,
                                           self.mixture.ids, self.mixture.cfg.seed, position)
            self.skipped.update(reason for _, reason in seq.skipped)
            yield seq, position[:2]

    def __iter__(self):
        sequences = self.sequences()
        while True:
            batch = []
            for _ in range(self.cfg.micro_batch_size):
                seq, after = next(sequences)
                batch.append(seq)
            self._consumed, self._offset = after
            yield collate(batch)

    # --------------------------------------------------------------------------------- checkpoints
    def _fingerprint(self) -> dict:
        m = self.mixture
        return {"seed": m.cfg.seed, "proportions": {s: m.cfg.proportions[s] for s in m.sources},
                "epoch_size": m.epoch_size, "seq_length": self.cfg.seq_length,
                "condition_dropout": self.cfg.condition_dropout}

    def state_dict(self) -> dict:
        """This rank's position after the last yielded batch."""
        return {"version": STATE_VERSION, "dp_rank": self.cfg.dp_rank, "dp_world_size": self.cfg.dp_world_size,
                "frontier": self._frontier, "carry": [list(c) for c in self._carry],
                "consumed": self._consumed, "offset": self._offset, "mixture": self._fingerprint()}

    def load_state_dict(self, states) -> None:
        """Resume from the states of every DP rank of the saving run (a list, or one dict if it had one
        rank). At the same DP size each rank continues exactly where it stopped; at another size the
        positions are merged (`merge_rank_states`) and the new ranks share what is left."""
        states = [states] if isinstance(states, dict) else list(states)
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {s.get('version')} != {STATE_VERSION}")
            if s["mixture"] != self._fingerprint():
                raise ValueError(f"loader state was saved with {s['mixture']}, this loader has {self._fingerprint()}")
        world = states[0]["dp_world_size"]
        by_rank = {s["dp_rank"]: s for s in states}
        if sorted(by_rank) != list(range(world)) or any(s["dp_world_size"] != world for s in states):
            raise ValueError(f"need the loader states of all {world} DP ranks, got ranks {sorted(by_rank)}")
        if world == self.cfg.dp_world_size:
            own = by_rank[self.cfg.dp_rank]
            self._frontier, self._carry = own["frontier"], [tuple(c) for c in own["carry"]]
            self._consumed, self._offset = own["consumed"], own["offset"]
        else:
            self._frontier, self._carry = merge_rank_states(states)
            self._consumed, self._offset = 0, 0
        self.skipped.clear()


def merge_rank_states(states: list[dict]) -> tuple[int, list]:
    """Positions of all ranks of one layout -> (frontier, carry) for any layout: every document >=
    frontier is untouched; carry lists, sorted, the documents below it that their rank has not finished,
    each with the offset where packing resumes (0: not started)."""
    world = states[0]["dp_world_size"]
    by_rank = {s["dp_rank"]: s for s in states}
    frontier, carry = states[0]["frontier"], [tuple(c) for c in states[0]["carry"]]  # common to all ranks

    def rest_of_queue(r):
        return _queue(frontier, carry, r, world, skip=by_rank[r]["consumed"])

    # Every document a rank has touched is below the document it stands at.
    new_frontier = max([frontier] + [next(rest_of_queue(r))[0] + 1 for r in range(world)])
    unfinished = []
    for r in range(world):
        for i, (g, start) in enumerate(rest_of_queue(r)):
            if g >= new_frontier:
                break
            unfinished.append((g, max(start, by_rank[r]["offset"]) if i == 0 else start))
    return new_frontier, sorted(unfinished)
