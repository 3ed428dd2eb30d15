"""The spoken-digits corpus of the TTS demo (issue 13 item 5): espeak-ng, in several voices and speeds, saying
the ten digit words and short digit phrases, written as 16 kHz mono WAV files plus raw JSONL of source `speech`
(segments {"voice"} — a random other utterance of the voice in the same split, first 3 s — {"text"}, {"audio", "start",
"end"}, and the speaker = voice).

Splits: `train.jsonl` (training voices, most utterances), `heldout.jsonl` (training voices, utterances none of
train's texts say in that voice and speed: every ~8th text, chosen by hash), `heldout_voice.jsonl` (one voice
never trained on, every text). espeak-ng is a Debian package (scripts/setup_system.sh installs it).
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile

import soundfile as sf
import torch

from latentlm_mcore.data.prep.audio import resample

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland")
HELDOUT_VOICE = "en-029+f2"
SPEEDS = (140, 175, 210)  # words per minute
SAMPLE_RATE = 16000


def digit_texts(phrases: int = 30, seed: int = 0) -> list[str]:
    """The ten digit words, then `phrases` phrases of two or three digits (fixed by `seed`)."""
    rng = random.Random(seed)
    texts = list(DIGITS)
    while len(texts) < len(DIGITS) + phrases:
        phrase = " ".join(rng.choice(DIGITS) for _ in range(rng.choice((2, 3))))
        if phrase not in texts:
            texts.append(phrase)
    return texts


def speak(text: str, voice: str, speed: int, path: str) -> float:
    """espeak-ng `text` to a 16 kHz mono WAV at `path`; returns its duration in seconds."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed: run scripts/setup_system.sh (apt-get install espeak-ng)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", tmp.name, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wav, rate = sf.read(tmp.name, dtype="float32", always_2d=True)
    wav16 = resample(torch.from_numpy(wav.mean(1)), rate, SAMPLE_RATE).numpy()
    sf.write(path, wav16, SAMPLE_RATE, subtype="PCM_16")
    return len(wav16) / SAMPLE_RATE


def _is_heldout(text: str, voice: str, speed: int) -> bool:
    return hashlib.sha1(f"{text}|{voice}|{speed}".encode()).digest()[0] % 8 == 0


def build_speech_corpus(out_dir: str, phrases: int = 30, voices=TRAIN_VOICES, heldout_voice=HELDOUT_VOICE,
                        speeds=SPEEDS) -> dict:
    """Write <out>/audio/<voice>/<id>.wav and the three JSONL splits; audio paths are relative to <out>."""
    splits = {"train": [], "heldout": [], "heldout_voice": []}
    for voice in tuple(voices) + (heldout_voice,):
        folder = os.path.join(out_dir, "audio", voice.replace("+", "_"))
        os.makedirs(folder, exist_ok=True)
        for speed in speeds:
            for i, text in enumerate(digit_texts(phrases)):
                doc_id = f"{voice.replace('+', '_')}-{speed}-{i:03d}"
                rel = os.path.join("audio", voice.replace("+", "_"), doc_id + ".wav")
                seconds = speak(text, voice, speed, os.path.join(out_dir, rel))
                doc = {"id": doc_id, "source": "speech", "speaker": voice,
                       "segments": [{"text": text}, {"audio": rel, "start": 0.0, "end": round(seconds, 4)}]}
                split = ("heldout_voice" if voice == heldout_voice
                         else "heldout" if _is_heldout(text, voice, speed) else "train")
                splits[split].append(doc)
    from latentlm_mcore.data.prep.convert_speech import add_voice_prompts

    for name, docs in splits.items():
        # prompts from the same split and voice (held-out audio never enters training), a random utterance of it:
        # with the next one in id order, digit k is always prompted with digit k+1 at its own speed, and a model
        # learns the prompt's length and content instead of the text's
        add_voice_prompts(docs, rng=random.Random(f"voice prompts {name}"))
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    return {name: len(docs) for name, docs in splits.items()}
