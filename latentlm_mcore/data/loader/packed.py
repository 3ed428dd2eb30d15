"""The packed loader: the mixture's global document sequence (`data/loader/mixture.py`) packed into one global
stream of sequences that data-parallel ranks take by index.

`PackedLoader` packs that document sequence into ONE global stream of sequences j = 0, 1, 2, ... — the
same on every rank, whatever the parallel layout (Megatron's global sample index is the model). DP rank r
of W with micro-batch b takes, from each block of b·W consecutive sequences, the sequences r·b ... r·b+b-1;
one optimizer step (global batch B, a multiple of b·W) therefore consumes the sequences
[step·B, (step+1)·B) under any layout, and a run resumed at another DP size continues with exactly the
global batches the original layout would have drawn. Every rank lays out every sequence (that reads only
token ids) but builds only its own: scaling latents, drawing σ-VAE samples and filling the tensors.

Per document, from (seed, g): condition dropout (a caption-first pair's caption dropped; a class document's
class token replaced by <NULL_CLASS>: DiT's label dropout; a speech document's text ids removed, leaving
`<BOD> prompt <EOD> <BOD> target <EOD>`), the flip of a class image pre-encoded with its
mirror (schema), the direction of a pair (caption → image or image →
caption), and the σ-VAE sample z = μ + σ·ε of each of its images and speech runs (one σ per latent run) (`latentlm_mcore.vae.sample_sigma_latents`,
the draw σ-VAE training uses), so every layout and every resume sees the same z, as input and as diffusion
target.

Checkpointing: the position after the last consumed block is the same on every rank; `state_dict()` is
small, and the trainer stores the list over DP ranks (all equal) and passes it to `load_state_dict` at any
DP size or micro-batch size.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from latentlm_mcore.data import schema
from latentlm_mcore.data.loader.mixture import StreamMixture
from latentlm_mcore.data.loader.packing import (DocumentShape, PackableDocument, SpecialIds, build_sequence, collate,
                                         layout_sequence)

STATE_VERSION = 2

_MASK = (1 << 64) - 1


def _seed(*key) -> int:
    """A 63-bit seed from a tuple of ints: splitmix64 over the key (a few µs; numpy's SeedSequence or
    default_rng cost 10-50× that, per document)."""
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = (h ^ (k & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h >> 1


def _uniform(*key) -> float:
    return (_seed(*key) >> 10) / float(1 << 53)


class DocumentReader(torch.utils.data.Dataset):
    """Global index -> PackableDocument: pair direction and condition dropout applied, latents still the
    stored μ (float16; `SequenceBuilder` samples and scales those of the documents a rank builds).
    Runs in loader workers."""

    def __init__(self, mixture: StreamMixture, condition_dropout: float, image_first_share: float = 0.5):
        if not 0 <= image_first_share <= 1 or not 0 <= condition_dropout <= 1:
            raise ValueError(f"image_first_share {image_first_share} and condition_dropout {condition_dropout} "
                             f"must lie in [0, 1]")
        self.mixture = mixture
        self.condition_dropout = condition_dropout
        self.image_first_share = image_first_share

    def _pair_choices(self, g: int) -> tuple[bool, bool]:
        """(image first, caption dropped) for a pair at global index g."""
        seed = self.mixture.cfg.seed
        image_first = _uniform(seed, 2, g) < self.image_first_share
        # Classifier-free guidance: sometimes the image is generated with no caption to condition on.
        dropped = not image_first and _uniform(seed, 1, g) < self.condition_dropout
        return image_first, dropped

    def __getitem__(self, g: int) -> PackableDocument:
        m, ids = self.mixture, self.mixture.ids
        sample = m.document(g)
        tokens = np.asarray(sample["tokens"], np.int32)
        if sample["source"] == "pair":  # whichever order it was stored in, the loader picks the direction
            image_first, dropped = self._pair_choices(g)
            tokens = _orient_pair(tokens, ids, image_first)  # image -> caption teaches captioning
            if dropped:
                tokens = tokens[np.isin(tokens, [ids.bod, ids.eod, ids.latent, ids.end_of_document])]
        latents = schema.decode_latents(sample["latents"], m.latent_dim)
        if sample["source"] == "class":
            tokens, latents = self._class_choices(g, tokens, latents)
        if sample["source"] == schema.SPEECH_SOURCE and self._speech_text_dropped(g):
            # CFG's unconditional stream: the prompt without the text (the latents stay: prompt, then target)
            tokens = tokens[np.isin(tokens, [ids.bod, ids.eod, ids.latent, ids.end_of_document])]
        doc = PackableDocument(index=g, source=sample["source"], tokens=tokens, latents=latents, scaled=False)
        doc.mark_runs(ids)
        return doc

    def _speech_text_dropped(self, g: int) -> bool:
        return _uniform(self.mixture.cfg.seed, 1, g) < self.condition_dropout  # caption dropout's key

    def _class_choices(self, g: int, tokens: np.ndarray, latents: np.ndarray):
        """Label dropout and the flip of the class document at global index g (its shape stays the same)."""
        seed, ids = self.mixture.cfg.seed, self.mixture.ids
        if _uniform(seed, 1, g) < self.condition_dropout:  # the key of caption dropout: the same decision
            if ids.null_class is None:
                raise ValueError(f"{self.mixture.cfg.dataset_root}: class documents, but the tokenizer has no "
                                 f"<NULL_CLASS> for label dropout (preprocess them with --tokenizer classes:N)")
            tokens = tokens.copy()
            tokens[0] = ids.null_class
        n = int(np.count_nonzero(tokens == ids.latent))
        if len(latents) == 2 * n:  # preprocessed with --hflip: the image's latents, then its mirror's
            latents = latents[n:] if _uniform(seed, 5, g) < 0.5 else latents[:n]
        return tokens, latents

    def shape(self, g: int):
        """Document g's DocumentShape as `__getitem__` would give it, from the layout index without reading
        the document; the document itself where the dataset has no index."""
        stored = self.mixture.stored_shape(g)
        if stored is None:
            return self[g]
        source, length, runs = stored
        if source == "pair":
            image_first, dropped = self._pair_choices(g)
            sizes = runs[:, 1] - runs[:, 0] + 1
            caption = 0 if dropped else length - 1 - int(sizes.sum())  # -1: <END_OF_DOCUMENT>
            if dropped:
                length = int(sizes.sum()) + 1
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) + (0 if image_first else caption)
            runs = np.stack([starts, starts + sizes - 1], 1) if len(runs) else runs
        if source == schema.SPEECH_SOURCE and self._speech_text_dropped(g):
            text = int(runs[1, 0] - runs[0, 1] - 1)  # between the prompt's <EOD> and the target's <BOD>
            runs = np.asarray(runs).copy()
            runs[1] -= text
            length -= text
        return DocumentShape(index=g, source=source, length=length, runs=runs)


def _orient_pair(tokens: np.ndarray, ids: SpecialIds, image_first: bool) -> np.ndarray:
    """A pair's ids with its image run(s) before the caption or after it (<END_OF_DOCUMENT> stays last)."""
    body = tokens[:-1] if len(tokens) and tokens[-1] == ids.end_of_document else tokens
    in_run = np.zeros(len(body), bool)
    for b, e in zip(np.flatnonzero(body == ids.bod), np.flatnonzero(body == ids.eod)):
        in_run[b:e + 1] = True
    first, second = (body[in_run], body[~in_run]) if image_first else (body[~in_run], body[in_run])
    return np.concatenate([first, second, tokens[len(body):]]).astype(np.int32)


class SequenceBuilder:
    """Latents of a document as the model sees them: the σ-VAE sample z = μ + σ·ε per image, drawn from
    (seed, g) — or μ itself with `sample_latents=False` — then shifted and scaled by the latent statistics."""

    def __init__(self, mixture: StreamMixture, sample_latents: bool):
        self.mixture, self.sample_latents = mixture, sample_latents
        self.generator = torch.Generator()

    def prepare(self, doc: PackableDocument) -> None:
        if doc.scaled:
            return
        m = self.mixture
        mu = torch.from_numpy(np.asarray(doc.latents, np.float32))
        if self.sample_latents and len(mu) and m.c_sigma is None:
            raise ValueError(f"{m.cfg.dataset_root}: the manifest's 'vae' has no 'c_sigma' (preprocessed before the "
                             f"loader drew σ-VAE samples): add the σ-VAE file's config.c_sigma there, or train on μ "
                             f"with sample_latents off")
        if self.sample_latents and len(mu) and m.c_sigma > 0:
            from latentlm_mcore.vae import sample_sigma_latents

            self.generator.manual_seed(_seed(m.cfg.seed, 3, doc.index))
            if doc.source == schema.SPEECH_SOURCE:  # runs of any length: one σ per run, drawn in order
                lengths = np.diff(doc.latent_before[np.flatnonzero(doc.tokens == m.ids.eod)], prepend=0)
                mu = torch.cat([sample_sigma_latents(run[None], m.c_sigma, self.generator)[0]
                                for run in torch.split(mu, lengths.tolist())])
            else:
                images = mu.reshape(-1, m.tokens_per_image, m.latent_dim)
                mu = sample_sigma_latents(images, m.c_sigma, self.generator).reshape(-1, m.latent_dim)
        doc.latents = ((mu.numpy() - m.latent_mean) / m.latent_std).astype(np.float32)
        doc.scaled = True


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
    condition_dropout: float = 0.1  # probability of dropping a caption-first pair's caption
    image_first_share: float = 0.5  # share of pairs emitted image -> caption (the rest caption -> image)
    sample_latents: bool = True  # the LM sees σ-VAE samples z = μ + σ·ε (False: μ)
    num_workers: int = 0  # document-reading processes per rank
    prefetch_factor: int = 8


@dataclass
class Block:
    """b·W consecutive sequences of the global stream: this rank's b built (`own`, after `blocks`), the
    rest only laid out."""
    first_sequence: int
    layouts: list  # pieces of every sequence of the block, in order
    dropped: list  # (document, reason) skipped while laying out each sequence
    position: tuple  # (document, offset) of the packer after the block
    tokens_by_source: Counter
    skipped: Counter
    own: list = field(default_factory=list)  # PackedSequence x micro_batch_size


class PackedLoader:
    """Iterates micro-batches (dicts of BATCH_FIELDS tensors) for one data-parallel rank, forever."""

    def __init__(self, mixture: StreamMixture, cfg: LoaderConfig):
        if not 0 <= cfg.dp_rank < cfg.dp_world_size:
            raise ValueError(f"dp_rank {cfg.dp_rank} not in [0, {cfg.dp_world_size})")
        self.mixture, self.cfg = mixture, cfg
        self.reader = DocumentReader(mixture, cfg.condition_dropout, cfg.image_first_share)
        self.builder = SequenceBuilder(mixture, cfg.sample_latents)
        # position after the last yielded batch: the global stream's next sequence and the packer there
        self._sequence, self._document, self._offset = 0, 0, 0
        self.tokens_by_source = Counter()  # tokens of every consumed sequence of the global stream, by source
        self.skipped = Counter()  # documents dropped by the packer, by reason
        self.consumed: list | None = None  # a list: the blocks yielded since `take_consumed` (sample-id log)

    # ---------------------------------------------------------------------------------- iteration
    def layout_blocks(self):
        """Blocks of the global stream from the current position on, laid out from document shapes."""
        cfg = self.cfg
        position, j = (self._document, self._offset, None), self._sequence
        while True:
            block = Block(j, [], [], None, Counter(), Counter())
            for _ in range(cfg.micro_batch_size * cfg.dp_world_size):
                pieces, dropped, shapes, position = layout_sequence(self.reader.shape, cfg.seq_length, position)
                block.layouts.append(pieces)
                block.dropped.append(dropped)
                block.skipped.update(reason for _, reason in dropped)
                for g, a, b in pieces:
                    block.tokens_by_source[shapes[g].source] += b - a
            block.position = position[:2]
            yield block
            j += len(block.layouts)

    def blocks(self):
        """Blocks with this rank's sequences built. Loader workers read (ahead) only the documents of them."""
        cfg, m = self.cfg, self.mixture
        mine = slice(cfg.dp_rank * cfg.micro_batch_size, (cfg.dp_rank + 1) * cfg.micro_batch_size)
        for_reader, for_building = itertools.tee(self.layout_blocks())

        def own_documents():
            last = None
            for block in for_reader:
                for pieces in block.layouts[mine]:
                    for g, _, _ in pieces:
                        if g != last:
                            yield g
                            last = g

        # Workers read ahead; the DataLoader hands documents back in sampler order.
        reader = iter(torch.utils.data.DataLoader(
            self.reader, sampler=_Indices(own_documents()), batch_size=None, num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None))
        current = {}
        for block in for_building:
            for pieces, dropped in zip(block.layouts[mine], block.dropped[mine]):
                for g, _, end in pieces:
                    if g not in current:
                        doc = next(reader)
                        if doc.index != g or doc.length < end:
                            raise RuntimeError(f"document {g}: the layout index does not match the shards")
                        self.builder.prepare(doc)
                        current[g] = doc
                block.own.append(build_sequence(pieces, current, cfg.seq_length, m.latent_dim, m.ids, m.cfg.seed,
                                                dropped))
                if pieces:  # only the last document can continue into this rank's next sequence
                    current = {pieces[-1][0]: current[pieces[-1][0]]}
            yield block

    def __iter__(self):
        for block in self.blocks():
            self._sequence = block.first_sequence + len(block.layouts)
            self._document, self._offset = block.position
            self.tokens_by_source.update(block.tokens_by_source)
            self.skipped.update(block.skipped)
            if self.consumed is not None:
                self.consumed.append((block.first_sequence, block.layouts))
            yield collate(block.own)

    def take_consumed(self) -> list[dict]:
        """The sequences of the global stream yielded since the last call (every DP rank's, laid out on each
        rank): their global index, the DP rank that trains them and their document pieces [global document
        index g, streaming sample id, start, end). Turned on by the first call."""
        blocks, self.consumed = self.consumed or [], []
        b, m = self.cfg.micro_batch_size, self.mixture
        return [{"index": first + i, "dp_rank": i // b,
                 "documents": [[g, m.sample_id(g), start, end] for g, start, end in pieces]}
                for first, layouts in blocks for i, pieces in enumerate(layouts)]

    def token_share(self) -> dict:
        """Realised share of each source in the tokens of the global batches consumed so far."""
        total = sum(self.tokens_by_source.values())
        return {s: self.tokens_by_source[s] / total for s in self.mixture.sources} if total else {}

    # --------------------------------------------------------------------------------- checkpoints
    def _fingerprint(self) -> dict:
        m, c = self.mixture, self.cfg
        return {"seed": m.cfg.seed, "proportions": {s: m.cfg.proportions[s] for s in m.sources}, "unit": m.cfg.unit,
                "epoch_size": m.epoch_size, "seq_length": c.seq_length, "condition_dropout": c.condition_dropout,
                "image_first_share": c.image_first_share, "sample_latents": c.sample_latents}

    def state_dict(self) -> dict:
        """The position after the last yielded batch (the same on every rank)."""
        return {"version": STATE_VERSION, "sequence": self._sequence, "document": self._document,
                "offset": self._offset, "tokens_by_source": dict(self.tokens_by_source),
                "skipped": dict(self.skipped), "mixture": self._fingerprint()}

    def load_state_dict(self, states) -> None:
        """Resume from the states of the saving run's DP ranks (a list, or one dict) at any DP size and
        micro-batch size whose b·W divides the sequences consumed (it always does at a step boundary)."""
        states = [states] if isinstance(states, dict) else list(states)
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {s.get('version')} != {STATE_VERSION}: saved by a loader "
                                 f"that split documents per rank; it cannot resume the global sequence stream")
            if s["mixture"] != self._fingerprint():
                raise ValueError(f"loader state was saved with {s['mixture']}, this loader has {self._fingerprint()}")
            if s != states[0]:
                raise ValueError("the DP ranks' loader states disagree; they must be one position of the global stream")
        state, per_block = states[0], self.cfg.micro_batch_size * self.cfg.dp_world_size
        if state["sequence"] % per_block:
            raise ValueError(f"the checkpoint consumed {state['sequence']} sequences, not a multiple of micro-batch "
                             f"{self.cfg.micro_batch_size} x DP {self.cfg.dp_world_size}")
        self._sequence, self._document, self._offset = state["sequence"], state["document"], state["offset"]
        self.tokens_by_source, self.skipped = Counter(state["tokens_by_source"]), Counter(state["skipped"])
