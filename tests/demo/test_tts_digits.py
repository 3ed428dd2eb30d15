"""demo/tts_digits.py: the generation plan (which digits in which voices, prompts never from training) and the
real pairs the speaker similarity is read against. Corpus files written here by hand (no audio needed)."""
import json

import pytest

from latentlm_mcore.demo.speech_corpus import DIGITS, HELDOUT_VOICE
from latentlm_mcore.demo.tts_digits import generation_plan, pair_similarities, read_split, voice_prompts

VOICES = ("en-us", "en-gb")


def _doc(voice, speed, i, text):
    doc_id = f"{voice.replace('+', '_')}-{speed}-{i:03d}"
    return {"id": doc_id, "source": "speech", "speaker": voice,
            "segments": [{"text": text}, {"audio": f"audio/{doc_id}.wav", "start": 0.0, "end": 1.0}]}


@pytest.fixture
def corpus(tmp_path):
    texts = ["one", "two", "seven two", "nine four one"]
    splits = {"train": [], "heldout": [], "heldout_voice": []}
    for voice in VOICES + (HELDOUT_VOICE,):
        for speed in (140, 175, 210):
            for i, text in enumerate(texts):
                split = ("heldout_voice" if voice == HELDOUT_VOICE
                         else "heldout" if (i + speed) % 2 else "train")
                splits[split].append(_doc(voice, speed, i, text))
    for name, docs in splits.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return tmp_path


def test_one_unseen_phrase_prompt_per_voice(corpus):
    prompts = voice_prompts(str(corpus))
    assert sorted(p["voice"] for p in prompts) == sorted(VOICES + (HELDOUT_VOICE,))
    train_audio = {d["audio"] for d in read_split(str(corpus), "train")}
    for p in prompts:
        assert p["audio"] not in train_audio
        assert " " in p["text"] and p["speed"] == 175  # a phrase at the middle speed
        assert p["heldout_voice"] == (p["voice"] == HELDOUT_VOICE)


def test_plan_is_every_digit_in_every_voice(corpus):
    plan = generation_plan(str(corpus))
    assert len(plan) == 3 * len(DIGITS)
    assert {(p["voice"], p["text"]) for p in plan} == {(v, d) for v in VOICES + (HELDOUT_VOICE,) for d in DIGITS}
    assert sum(p["heldout_voice"] for p in plan) == len(DIGITS)


def test_real_pairs_are_same_and_different_voices(corpus):
    docs = read_split(str(corpus), "heldout") + read_split(str(corpus), "heldout_voice")
    voice_of = {d["audio"]: d["voice"] for d in docs}
    seen = []

    def similarity(a, b):  # "wavs" are the audio paths here: record which voices each pair compares
        seen.append((voice_of[a], voice_of[b]))
        return 1.0 if voice_of[a] == voice_of[b] else 0.0

    result = pair_similarities(docs, {d["audio"]: d["audio"] for d in docs}, similarity)
    assert result["same_voice"] == 1.0 and result["different_voice"] == 0.0
    assert result["same_voice_pairs"] > 0 and result["different_voice_pairs"] > 0
    assert result["same_voice_pairs"] + result["different_voice_pairs"] == len(seen)
