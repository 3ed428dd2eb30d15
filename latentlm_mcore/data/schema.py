"""The data formats, in one place.

Raw JSONL (what `data_prep/` writes, what preprocessing reads), one document per line:
    {"id": str, "source": "text" | "pair" | "interleaved", "segments": [{"text": str} | {"image": path}]}
    {"id": str, "source": "class", "label": int, "segments": [{"image": path}]}   class-conditional images
    {"id": str, "source": "speech", "speaker": str,
     "segments": [{"voice": path, "start": s, "end": e},    optional voice prompt: another utterance of the same
                                                            speaker (<= 3 s used), chosen by the converter
                  {"text": str},                            the target's transcript
                  {"audio": path, "start": s, "end": e}]}   the target utterance (start / end optional: whole file)
Image paths are relative to one image root, audio paths to one audio root (absolute paths must lie inside it).

Speech documents (paper §3.3: zero-shot TTS, "speech prompt + text -> speech") are preprocessed with an audio
σ-VAE (`vae/audio_model.py`; `prep/speech.py`) into
    <BOD> prompt latents <EOD> text ids <BOD> target latents <EOD> <END_OF_DOCUMENT>
with <LATENT> at each latent position; `latents` holds the prompt's rows, then the target's. Without a `voice`
segment the prompt is the target's own first min(3 s, half the utterance) of latents (paper setting 2, "3 s
prefix as prompt"); the target stays whole. No new special ids: <BOD>/<EOD> open and close any latent run.
Speech runs have variable length, so the LM head also learns when to stop: at a latent position of a speech
run its cross-entropy target is the next id, <LATENT> ("one more latent") or <EOD> (`loader/packing.py`).
The loader's condition dropout removes a speech document's text ids (classifier-free guidance), and draws the
σ-VAE sample z = μ + σ·ε with one σ per latent run. One σ-VAE per dataset: speech is preprocessed with
`--audio-vae` into its own output (the model has one latent projection), images with `--vae`.

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

SPEECH_SOURCE = "speech"
SOURCES = ("text", "pair", "interleaved", "class", SPEECH_SOURCE)
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
AUDIO_OUTSIDE_ROOT = "audio_outside_root"
AUDIO_TOO_SHORT = "audio_too_short"  # fewer than 2 latent frames: no prompt prefix can be cut from it
REJECT_REASONS = (INVALID_JSON, INVALID_SCHEMA, EMPTY_DOCUMENT, DUPLICATE_ID, IMAGE_MISSING,
                  IMAGE_OUTSIDE_ROOT, IMAGE_UNREADABLE, IMAGE_TRUNCATED, IMAGE_TOO_LARGE, LABEL_OUT_OF_RANGE,
                  AUDIO_MISSING, AUDIO_UNREADABLE, AUDIO_WRONG_RATE, AUDIO_TOO_LONG, AUDIO_SILENT, AUDIO_CLIPPED,
                  AUDIO_OUTSIDE_ROOT, AUDIO_TOO_SHORT)


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
    speaker: str | None = None  # source "speech"

    @property
    def image_paths(self) -> list[str]:
        return [s["image"] for s in self.segments if "image" in s]

    def to_json(self) -> str:
        obj = {"id": self.id, "source": self.source, "segments": self.segments}
        if self.label is not None:
            obj["label"] = self.label
        if self.speaker is not None:
            obj["speaker"] = self.speaker
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
    if obj["source"] == SPEECH_SOURCE:
        return _validate_speech(doc_id, obj, segments)
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


def _audio_segment(i: int, seg, key: str) -> dict:
    if not isinstance(seg, dict) or key not in seg or not set(seg) <= {key, "start", "end"} \
            or not isinstance(seg[key], str) or not seg[key]:
        raise RejectedDocument(INVALID_SCHEMA, f"segment {i} is not {{{key!r}: path, 'start': s, 'end': e}}")
    for k in ("start", "end"):
        v = seg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise RejectedDocument(INVALID_SCHEMA, f"segment {i} {k!r} must be a number of seconds >= 0, got {v!r}")
    if seg.get("start") is not None and seg.get("end") is not None and not seg["end"] > seg["start"]:
        raise RejectedDocument(INVALID_SCHEMA, f"segment {i} ends at {seg['end']} s, not after its start {seg['start']} s")
    return dict(seg)


def _validate_speech(doc_id: str, obj: dict, segments: list) -> RawDocument:
    """[{"voice"...}?, {"text"}, {"audio"...}] in this order (see the module docstring)."""
    speaker = obj.get("speaker", "")
    if not isinstance(speaker, str):
        raise RejectedDocument(INVALID_SCHEMA, f"'speaker' must be a string, got {speaker!r}")
    if "label" in obj:
        raise RejectedDocument(INVALID_SCHEMA, "'label' belongs to source 'class', not 'speech'")
    kinds = [next(iter(s), None) if isinstance(s, dict) else type(s).__name__ for s in segments]
    has_voice = bool(segments) and isinstance(segments[0], dict) and "voice" in segments[0]
    if len(segments) != 2 + has_voice:
        raise RejectedDocument(INVALID_SCHEMA, f"a speech document is [voice?, text, audio] segments, got {kinds}")
    kept = [_audio_segment(0, segments[0], "voice")] if has_voice else []
    text = segments[has_voice]
    if not isinstance(text, dict) or set(text) != {"text"} or not isinstance(text["text"], str):
        raise RejectedDocument(INVALID_SCHEMA, f"segment {int(has_voice)} of a speech document must be {{'text': str}}")
    if not text["text"].strip():
        raise RejectedDocument(EMPTY_DOCUMENT, "a speech document's transcript is empty")
    try:
        text["text"].encode("utf-8")
    except UnicodeEncodeError as e:
        raise RejectedDocument(INVALID_SCHEMA, f"transcript is not valid Unicode: {e}") from None
    kept += [dict(text), _audio_segment(1 + has_voice, segments[1 + has_voice], "audio")]
    return RawDocument(id=doc_id, source=SPEECH_SOURCE, segments=kept, speaker=speaker)


def encode_latents(latents) -> bytes:


    return np.ascontiguousarray(latents, dtype="<f2").tobytes()


def decode_latents(data: bytes, latent_dim: int):


    return np.frombuffer(data, dtype="<f2").reshape(-1, latent_dim)


def part_name(shard_index: int, num_shards: int) -> str:
    return f"part-{shard_index:05d}-of-{num_shards:05d}"


def read_manifest(dataset_root: str) -> dict:
    with open(os.path.join(dataset_root, MANIFEST_NAME)) as f:
        return json.load(f)
