"""The data formats, in one place.

Raw JSONL (what `data_prep/` writes, what preprocessing reads), one document per line:
    {"id": str, "source": "text" | "pair" | "interleaved", "segments": [{"text": str} | {"image": path}]}
    {"id": str, "source": "class", "label": int, "segments": [{"image": path}]}   class-conditional images
Image paths are relative to one image root (absolute paths must lie inside it).

Class documents (paper §3.1: class-conditional ImageNet) are preprocessed with a class vocabulary
(`tokenizer.ClassVocabulary`, spec `classes:N`: class c is id c, <NULL_CLASS> is N, the specials follow;
N = 1000 pads to the presets' 1,024) into `<class c> <BOD> latents <EOD> <END_OF_DOCUMENT>`: 260 ids for
256 latents, the ImageNet presets' sequence, so every sequence is one image with its class token at
position 0. The loader's label dropout puts <NULL_CLASS> in place of the class (classifier-free guidance).
With horizontal flips (`PreprocessConfig.hflip`, DiT's augmentation) a class document's `latents` hold
2 x num_latents rows: the image's, then its mirror's, both encoded by the σ-VAE (flipping the latent grid
is not exact: each latent codes a whole patch); the loader takes one of the two per (seed, document index).

Pre-encoded MDS sample (one document), see `MDS_COLUMNS`:
    tokens   int32[n]            text ids; <BOD>, num_latents x <LATENT>, <EOD> around each image;
                                 <END_OF_DOCUMENT> last
    latents  float16[m, latent_dim]  every image's σ-VAE latents (unscaled μ), in order; m = images x num_latents.
                                 Stored as the array's raw little-endian bytes: MDS cannot encode an empty
                                 ndarray, and text documents have m = 0. `decode_latents` reads it back.
    doc_id   str
    source   str

Output folder of preprocessing:
    <out>/<source>/part-XXXXX-of-YYYYY/   MDS shards of one Slurm array task, one folder per source
    <out>/<source>/index.json            written by the merge step: one streaming dataset per source
    <out>/<source>/layout_{lengths,run_counts,runs}.npy  merge step: each document's length and image runs,
                                         in sample order (the loader lays out sequences from them)
    <out>/parts/part-XXXXX-of-YYYYY.json  a finished task's manifest (its presence = the part is done)
    <out>/parts/part-XXXXX-of-YYYYY.rejects.jsonl  one line per skipped document: id, reason, detail
    <out>/manifest.json                  merged manifest (see `prep.merge.merge_parts`)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

SOURCES = ("text", "pair", "interleaved", "class")
# Raw JSONL of speech (data_prep/convert.py librispeech|libriheavy): segments {"text": str} then
# {"audio": path, "start": s, "end": e} (seconds, path relative to the audio root), plus "speaker". Not yet in
# SOURCES: preprocessing does not encode audio yet (issue 13 item 2, next session).
SPEECH_SOURCE = "speech"
MDS_COLUMNS = {"tokens": "ndarray:int32", "latents": "bytes", "doc_id": "str", "source": "str"}
MANIFEST_NAME = "manifest.json"

# Why a document was skipped. The manifest counts documents per reason.
INVALID_JSON = "invalid_json"
INVALID_SCHEMA = "invalid_schema"
EMPTY_DOCUMENT = "empty_document"
DUPLICATE_ID = "duplicate_id"
IMAGE_MISSING = "image_missing"
IMAGE_OUTSIDE_ROOT = "image_outside_root"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_TRUNCATED = "image_truncated"
IMAGE_TOO_LARGE = "image_too_large"
LABEL_OUT_OF_RANGE = "label_out_of_range"  # a class document's label the class vocabulary has no id for
# Speech (data/prep/audio.py): file absent; not audio, corrupt or a segment outside the file; sampled below
# 8 kHz; longer than the limit; silence (RMS < -80 dBFS); clipped (> 1% of samples at full scale).
AUDIO_MISSING = "audio_missing"
AUDIO_UNREADABLE = "audio_unreadable"
AUDIO_WRONG_RATE = "audio_wrong_rate"
AUDIO_TOO_LONG = "audio_too_long"
AUDIO_SILENT = "audio_silent"
AUDIO_CLIPPED = "audio_clipped"
REJECT_REASONS = (INVALID_JSON, INVALID_SCHEMA, EMPTY_DOCUMENT, DUPLICATE_ID, IMAGE_MISSING,
                  IMAGE_OUTSIDE_ROOT, IMAGE_UNREADABLE, IMAGE_TRUNCATED, IMAGE_TOO_LARGE, LABEL_OUT_OF_RANGE,
                  AUDIO_MISSING, AUDIO_UNREADABLE, AUDIO_WRONG_RATE, AUDIO_TOO_LONG, AUDIO_SILENT, AUDIO_CLIPPED)


@dataclass
class SpecialIds:
    bod: int
    eod: int
    latent: int
    end_of_document: int
    pad: int
    null_class: int | None = None  # class vocabularies only: what label dropout puts in place of the class

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SpecialIds":
        ids = manifest["tokenizer"]["special_ids"]
        return cls(bod=ids["<BOD>"], eod=ids["<EOD>"], latent=ids["<LATENT>"],
                   end_of_document=ids["<END_OF_DOCUMENT>"], pad=ids["<PAD>"], null_class=ids.get("<NULL_CLASS>"))


def image_runs(tokens: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """(<BOD>, <EOD>) positions of each image run of a document's ids, int32 [r, 2]."""
    return np.stack([np.flatnonzero(tokens == ids.bod), np.flatnonzero(tokens == ids.eod)], 1).astype(np.int32)


class RejectedDocument(Exception):
    """A document that is skipped; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str, doc_id: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.doc_id = doc_id  # when the line has a usable id, even if the rest is bad


@dataclass
class RawDocument:
    id: str
    source: str
    segments: list[dict]  # each {"text": str} or {"image": str}
    label: int | None = None  # source "class": the class index

    @property
    def image_paths(self) -> list[str]:
        return [s["image"] for s in self.segments if "image" in s]

    def to_json(self) -> str:
        obj = {"id": self.id, "source": self.source, "segments": self.segments}
        if self.label is not None:
            obj["label"] = self.label
        return json.dumps(obj, ensure_ascii=False)


def parse_raw_line(line: bytes | str) -> RawDocument:
    """Parse and validate one raw JSONL line; raise RejectedDocument saying what is wrong."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise RejectedDocument(INVALID_JSON, str(e)[:200]) from None
    if not isinstance(obj, dict):
        raise RejectedDocument(INVALID_SCHEMA, f"line is a JSON {type(obj).__name__}, not an object")
    doc_id = obj.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        raise RejectedDocument(INVALID_SCHEMA, "'id' must be a non-empty string")
    try:
        return _validate(doc_id, obj)
    except RejectedDocument as e:
        e.doc_id = doc_id
        raise


def _validate(doc_id: str, obj: dict) -> RawDocument:
    if obj.get("source") not in SOURCES:
        raise RejectedDocument(INVALID_SCHEMA, f"'source' must be one of {SOURCES}, got {obj.get('source')!r}")
    segments = obj.get("segments")
    if not isinstance(segments, list):
        raise RejectedDocument(INVALID_SCHEMA, "'segments' must be a list")
    kept = []
    for i, seg in enumerate(segments):
        if isinstance(seg, dict) and set(seg) == {"text"} and isinstance(seg["text"], str):
            try:
                seg["text"].encode("utf-8")  # JSON escapes can smuggle in lone surrogates
            except UnicodeEncodeError as e:
                raise RejectedDocument(INVALID_SCHEMA, f"segment {i} text is not valid Unicode: {e}") from None
            if seg["text"]:
                kept.append(seg)
        elif isinstance(seg, dict) and set(seg) == {"image"} and isinstance(seg["image"], str) and seg["image"]:
            kept.append(seg)
        else:
            raise RejectedDocument(INVALID_SCHEMA, f"segment {i} is not {{'text': str}} or {{'image': path}}")
    if not kept:
        raise RejectedDocument(EMPTY_DOCUMENT, "no text and no image")
    if obj["source"] == "class":
        return _validate_class(doc_id, obj, kept)
    if "label" in obj:
        raise RejectedDocument(INVALID_SCHEMA, f"'label' belongs to source 'class', not {obj['source']!r}")
    return RawDocument(id=doc_id, source=obj["source"], segments=kept)


def _validate_class(doc_id: str, obj: dict, segments: list[dict]) -> RawDocument:
    label = obj.get("label")
    # bool is an int in Python; JSON true is no class index
    if not isinstance(label, int) or isinstance(label, bool):
        raise RejectedDocument(INVALID_SCHEMA, f"a class document needs an integer 'label', got {label!r}")
    if label < 0:
        raise RejectedDocument(LABEL_OUT_OF_RANGE, f"label {label} is negative")
    if len(segments) != 1 or "image" not in segments[0]:
        raise RejectedDocument(INVALID_SCHEMA, f"a class document is exactly one image segment, got "
                                               f"{[next(iter(s)) for s in segments]}")
    return RawDocument(id=doc_id, source="class", segments=segments, label=label)


def encode_latents(latents) -> bytes:


    return np.ascontiguousarray(latents, dtype="<f2").tobytes()


def decode_latents(data: bytes, latent_dim: int):


    return np.frombuffer(data, dtype="<f2").reshape(-1, latent_dim)


def part_name(shard_index: int, num_shards: int) -> str:
    return f"part-{shard_index:05d}-of-{num_shards:05d}"


def read_manifest(dataset_root: str) -> dict:
    with open(os.path.join(dataset_root, MANIFEST_NAME)) as f:
        return json.load(f)
