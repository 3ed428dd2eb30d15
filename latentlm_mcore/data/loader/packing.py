"""Pack documents into fixed-length sequences of text ids and latent vectors.

A document (one MDS sample) is a run of ids in which each image appears as
`<BOD>`, num_latents x `<LATENT>`, `<EOD>`, with its latents (as the model sees them) alongside, and
`<END_OF_DOCUMENT>` last. Documents are laid end to end. Text may continue in the next sequence; an
image run never does: if it does not fit in what is left of a sequence, the rest is padded and the run
opens the next one. A document with an image run longer than the sequence cannot be packed and is
skipped (counted in `PackedSequence.skipped` by reason `image_run_longer_than_sequence`).

BATCH CONTRACT (one packed sequence of length s; collate stacks each field into [b, s, ...]):
    tokens             int64 [s]        input ids; the <LATENT> placeholder where a latent is the input
    labels             int64 [s]        tokens[i+1]; the last position holds <PAD> and is masked
    loss_mask          float32 [s]      1 where labels[i] counts for cross-entropy: tokens[i+1] exists, is
                                        not <LATENT> and not <PAD>. <BOD>/<EOD> are ordinary targets.
                                        Speech documents also at every latent position i of their runs:
                                        the target <LATENT> ("one more latent") or <EOD> ("stop"), since
                                        speech runs vary in length (images' do not: they keep the rule above)
    latent_mask        bool [s]         position i holds a latent (its embedding is the latent projection)
    latents            float32 [s, d]   the latent at input position i (zeros elsewhere), unit-scaled
    diffusion_mask     float32 [s]      1 where position i+1 holds a latent (h_i gets the diffusion loss)
    diffusion_targets  float32 [s, d]   latents[i+1] where diffusion_mask, zeros elsewhere
    position_ids       int64 [s]        0..s-1
    noise_seed         int64 scalar     from (loader seed, global index and offset of the sequence's first
                                        document piece): the same sequence gets the same diffusion noise
                                        under any parallel layout and after any resume

The trainer reads `noise_seed` and `diffusion_mask` on the host and never moves them to the device
(training/step.py HOST_FIELDS): the diffusion head's rows and noise are decided without a device read-back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from latentlm_mcore.data.schema import SPEECH_SOURCE, SpecialIds, image_runs  # noqa: F401  (the format contract)

BATCH_FIELDS = ("tokens", "labels", "loss_mask", "latent_mask", "latents", "diffusion_mask",
                "diffusion_targets", "position_ids", "noise_seed")
IMAGE_RUN_TOO_LONG = "image_run_longer_than_sequence"


@dataclass
class PackableDocument:
    """One document ready to pack: `index` is its global position in the mixture's sample order."""
    index: int
    source: str
    tokens: np.ndarray  # int32 [n]
    latents: np.ndarray  # float32 [m, d], one row per <LATENT> in tokens, in order
    start: int = 0  # offset where packing begins
    scaled: bool = True  # latents are as the model sees them (False: stored μ, to be sampled and scaled)
    run_start: np.ndarray = field(init=False)  # int64 [n]: index of the <BOD> for positions inside an image run, else -1
    latent_before: np.ndarray = field(init=False)  # int64 [n+1]: number of latents before position j

    def mark_runs(self, ids: SpecialIds) -> None:
        self.run_start = np.full(len(self.tokens), -1, np.int64)
        bods = np.flatnonzero(self.tokens == ids.bod)
        eods = np.flatnonzero(self.tokens == ids.eod)
        if len(bods) != len(eods) or np.any(eods <= bods):
            raise ValueError(f"document {self.index}: unbalanced <BOD>/<EOD>")
        for b, e in zip(bods, eods):
            self.run_start[b:e + 1] = b
        self.latent_before = np.concatenate([[0], np.cumsum(self.tokens == ids.latent)])
        if self.latent_before[-1] != len(self.latents):
            raise ValueError(f"document {self.index}: {self.latent_before[-1]} <LATENT> ids but "
                             f"{len(self.latents)} latents")

    @property
    def length(self) -> int:
        return len(self.tokens)

    def longest_run(self) -> int:
        if not np.any(self.run_start >= 0):
            return 0
        starts, counts = np.unique(self.run_start[self.run_start >= 0], return_counts=True)
        return int(counts.max())


@dataclass
class DocumentShape:
    """What the layout of sequences needs of a document: its length and image runs (no ids, no latents)."""
    index: int
    source: str
    length: int
    runs: np.ndarray  # int [r, 2]: (<BOD> position, <EOD> position) of each image run
    start: int = 0

    @property
    def run_start(self) -> np.ndarray:
        if self._run_start is None:
            self._run_start = np.full(self.length, -1, np.int64)
            for b, e in self.runs:
                self._run_start[b:e + 1] = b
        return self._run_start

    def longest_run(self) -> int:
        return int((self.runs[:, 1] - self.runs[:, 0]).max()) + 1 if len(self.runs) else 0

    def __post_init__(self):
        self._run_start = None


@dataclass
class PackedSequence:
    fields: dict  # BATCH_FIELDS -> numpy arrays
    pieces: list  # (document index, start, end) of each document slice in the sequence, in order
    skipped: list  # (document index, reason) of documents dropped while filling this sequence


def layout_sequence(next_document, seq_length: int, position: tuple[int, int, PackableDocument | None]):
    """Decide which document slices fill one sequence of `seq_length`, reading `next_document(pos)` (the
    PackableDocument or DocumentShape at queue position pos) as needed; only lengths and image runs are
    looked at, so the layout of a sequence some other rank builds costs little.

    `position` = (queue position, token offset, current document or None) says where the previous
    sequence stopped; returns (pieces, skipped, documents, new position): pieces (document index, start,
    end), skipped (document index, reason), documents {index: PackableDocument} of the pieces.
    Deterministic in its inputs, which is what makes resuming exact: a resumed loader re-reads the
    document at the saved queue position and continues from the saved offset."""
    queue_pos, offset, doc = position
    s = seq_length
    pieces, skipped, documents = [], [], {}
    fill = 0
    while fill < s:
        if doc is None:
            doc = next_document(queue_pos)
            if doc.longest_run() > s:
                skipped.append((doc.index, IMAGE_RUN_TOO_LONG))
                queue_pos, offset, doc = queue_pos + 1, 0, None
                continue
            offset = max(offset, doc.start)
        n = doc.length
        end = min(n, offset + s - fill)
        if end < n and doc.run_start[end] >= 0 and doc.run_start[end] < end:
            end = int(doc.run_start[end])  # would cut an image run: stop before its <BOD>
        if end == offset:
            break  # the next image run does not fit: pad; it opens the next sequence
        pieces.append((doc.index, offset, end))
        documents[doc.index] = doc
        fill += end - offset
        offset = end
        if offset == n:
            queue_pos, offset, doc = queue_pos + 1, 0, None
    return pieces, skipped, documents, (queue_pos, offset, doc)


def build_sequence(pieces, documents: dict, seq_length: int, latent_dim: int, ids: SpecialIds, seed: int,
                   skipped=()) -> PackedSequence:
    """The contract fields of one sequence laid out by `layout_sequence` (documents' latents as given)."""
    s = seq_length
    tokens = np.full(s, ids.pad, np.int64)
    latents = np.zeros((s, latent_dim), np.float32)
    speech = np.zeros(s, bool)
    fill = 0
    for g, offset, end in pieces:
        doc = documents[g]
        k = end - offset
        tokens[fill:fill + k] = doc.tokens[offset:end]
        speech[fill:fill + k] = doc.source == SPEECH_SOURCE
        la, lb = doc.latent_before[offset], doc.latent_before[end]
        if lb > la:
            latents[fill:fill + k][doc.tokens[offset:end] == ids.latent] = doc.latents[la:lb]
        fill += k

    latent_mask = tokens == ids.latent
    labels = np.empty_like(tokens)
    labels[:-1], labels[-1] = tokens[1:], ids.pad
    loss_mask = np.zeros(s, np.float32)
    loss_mask[:-1] = (tokens[1:] != ids.latent) & (tokens[1:] != ids.pad)
    loss_mask[:-1][speech[:-1] & latent_mask[:-1] & latent_mask[1:]] = 1  # speech: "one more latent" (a run
    # never crosses a sequence end, so a latent's next position is in this sequence and is <LATENT> or <EOD>)
    diffusion_mask = np.zeros(s, np.float32)
    diffusion_mask[:-1] = latent_mask[1:]
    diffusion_targets = np.zeros_like(latents)
    diffusion_targets[:-1] = latents[1:]
    first = pieces[0][:2] if pieces else (-1, 0)
    noise_seed = int(np.random.SeedSequence([seed, first[0] + 1, first[1]]).generate_state(1, np.uint64)[0] >> 1)
    fields = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "latent_mask": latent_mask,
              "latents": latents, "diffusion_mask": diffusion_mask, "diffusion_targets": diffusion_targets,
              "position_ids": np.arange(s, dtype=np.int64), "noise_seed": np.int64(noise_seed)}
    return PackedSequence(fields, list(pieces), list(skipped))


def pack_documents(next_document, seq_length: int, latent_dim: int, ids: SpecialIds, seed: int,
                   position: tuple[int, int, PackableDocument | None]):
    """Fill one sequence: `layout_sequence` then `build_sequence`. Returns (PackedSequence, new position)."""
    pieces, skipped, documents, position = layout_sequence(next_document, seq_length, position)
    return build_sequence(pieces, documents, seq_length, latent_dim, ids, seed, skipped), position


def collate(sequences: list[PackedSequence]) -> dict[str, torch.Tensor]:
    """Stack the contract fields of b sequences into tensors [b, s, ...] (noise_seed: [b])."""
    return {name: torch.from_numpy(np.stack([seq.fields[name] for seq in sequences])) for name in BATCH_FIELDS}
