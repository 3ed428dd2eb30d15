"""Converters from speech corpora to the raw JSONL of `data/schema.py` (source "speech"), beside `convert.py`'s
image and text converters; the same contract (yield raw documents, count what could not be used).

- librispeech: LibriSpeech (`*.trans.txt` + `<id>.flac`) / LibriTTS (`<id>.normalized.txt` + `<id>.wav`)
- libriheavy:  Libriheavy / lhotse cut JSONL, or flat {audio, start, end, text, speaker}

Each utterance gets a voice prompt (`add_voice_prompts`): the same speaker's next utterance, cut to 3 s.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from typing import Iterator

from latentlm_mcore.data.prep.convert import _json_lines

AUDIO_EXTENSIONS = (".flac", ".wav")


def _speech_doc(doc_id: str, text: str, audio: str, start: float, end: float, speaker: str) -> dict:
    return {"id": doc_id, "source": "speech", "speaker": speaker,
            "segments": [{"text": text}, {"audio": audio, "start": round(float(start), 4), "end": round(float(end), 4)}]}


VOICE_PROMPT_SECONDS = 3.0


def add_voice_prompts(docs: list[dict], seconds: float = VOICE_PROMPT_SECONDS,
                      rng: random.Random | None = None) -> list[dict]:
    """Give each speech document a voice prompt (schema): the next utterance of the same speaker in sorted id
    order (the last one takes the first), cut to its first `seconds`; none when the speaker is unknown ("") or
    has one utterance. With `rng` the order is a seeded shuffle of the sorted one: a random other utterance of
    the speaker, for corpora whose id order ties an utterance to its prompt's content or length (the spoken
    digits: digit k's next utterance is digit k+1 at the same speed). Deterministic, so a rerun writes the same
    JSONL."""
    by_speaker: dict[str, list[dict]] = {}
    for d in docs:
        if d.get("speaker"):
            by_speaker.setdefault(d["speaker"], []).append(d)
    for group in by_speaker.values():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda d: d["id"])
        if rng is not None:
            rng.shuffle(group)
        for d, other in zip(group, group[1:] + group[:1]):
            src = other["segments"][-1]
            start = src.get("start") or 0.0
            end = start + seconds if src.get("end") is None else min(src["end"], start + seconds)
            d["segments"] = [{"voice": src["audio"], "start": start, "end": round(end, 4)}] + \
                [s for s in d["segments"] if "voice" not in s]
    return docs


def _duration(path: str) -> float | None:
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception:
        return None
    return info.frames / info.samplerate


def convert_librispeech(roots: list[str], skipped: Counter) -> Iterator[dict]:
    """Walk each root for LibriSpeech transcripts (`<spk>-<chap>.trans.txt`: lines `<id> <TEXT>`, audio
    `<id>.flac` beside it) and LibriTTS ones (`<id>.normalized.txt`, audio `<id>.wav`). Audio paths are
    relative to the root they were found under (the audio root preprocessing is given); the speaker is the
    id's first field. Utterances whose audio is missing or unreadable are skipped by reason. Each document's
    voice prompt is another utterance of its speaker (`add_voice_prompts`): all are collected first."""
    from latentlm_mcore.data import schema
    docs = []
    for root in roots:
        for folder, _, files in sorted(os.walk(root)):
            pairs = []
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.endswith(".trans.txt"):
                    with open(path, encoding="utf-8", errors="replace") as f:
                        for line in f:
                            uid, _, text = line.strip().partition(" ")
                            if uid:
                                pairs.append((uid, text.strip(), uid + ".flac"))
                elif name.endswith(".normalized.txt"):
                    uid = name[: -len(".normalized.txt")]
                    with open(path, encoding="utf-8", errors="replace") as f:
                        pairs.append((uid, f.read().strip(), uid + ".wav"))
            for uid, text, audio_name in pairs:
                audio = os.path.join(folder, audio_name)
                if not text:
                    skipped[schema.EMPTY_DOCUMENT] += 1
                    continue
                if not os.path.isfile(audio):
                    skipped[schema.AUDIO_MISSING] += 1
                    continue
                seconds = _duration(audio)
                if seconds is None:
                    skipped[schema.AUDIO_UNREADABLE] += 1
                    continue
                docs.append(_speech_doc(uid, text, os.path.relpath(audio, root), 0.0, seconds,
                                        uid.split("-")[0].split("_")[0]))
    yield from add_voice_prompts(docs)


def convert_libriheavy(paths: list[str], skipped: Counter) -> Iterator[dict]:
    """Libriheavy manifests: lhotse cuts ({"id", "start", "duration", "recording": {"sources": [{"source"}]},
    "supervisions": [{"text" or "custom": {"texts": [...]}, "speaker"}]}) or flat lines {"id", "audio",
    "start", "end", "text", "speaker"}. Audio paths are kept as written (relative to the audio root); they
    are decoded and checked in preprocessing (data/prep/audio.py). Voice prompts as `add_voice_prompts`
    (same speaker, next cut in sorted id order, first 3 s)."""
    from latentlm_mcore.data import schema
    docs = []
    for path in paths:
        for lineno, line in _json_lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped[schema.INVALID_JSON] += 1
                continue
            try:
                if "recording" in obj:
                    sup = obj["supervisions"][0]
                    text = sup.get("text") or (sup.get("custom") or {}).get("texts", [""])[0]
                    audio = obj["recording"]["sources"][0]["source"]
                    start, end = float(obj["start"]), float(obj["start"]) + float(obj["duration"])
                    speaker = str(sup.get("speaker", ""))
                else:
                    text, audio = obj["text"], obj["audio"]
                    start, end, speaker = float(obj["start"]), float(obj["end"]), str(obj.get("speaker", ""))
                doc_id = str(obj.get("id") or f"{os.path.basename(path)}:{lineno}")
            except (KeyError, IndexError, TypeError, ValueError):
                skipped[schema.INVALID_SCHEMA] += 1
                continue
            if not isinstance(text, str) or not text.strip() or not isinstance(audio, str) or not end > start >= 0:
                skipped[schema.INVALID_SCHEMA] += 1
                continue
            docs.append(_speech_doc(doc_id, text.strip(), audio, start, end, speaker))
    yield from add_voice_prompts(docs)
