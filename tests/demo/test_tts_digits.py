"""demo/tts_digits.py: the generation plan (which digits in which voices, prompts never from training) and the
real pairs the speaker similarity is read against. Corpus files written here by hand (no audio needed)."""
import json

import pytest

from latentlm_mcore.demo.speech_corpus import DIGITS, HELDOUT_VOICE
from latentlm_mcore.demo.tts_digits import (generation_plan, pair_similarities, prompt_references, read_split,
                                            voice_prompts)

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


def _all_docs(corpus):
    return [d for split in ("train", "heldout", "heldout_voice") for d in read_split(str(corpus), split)]


def _recording_similarity(docs, seen):
    """A stand-in speaker encoder: "wavs" are the audio paths; it records each pair's two documents and scores
    1 for the same voice, 0 for two voices."""
    doc_of = {d["audio"]: d for d in docs}

    def similarity(a, b):
        seen.append((doc_of[a], doc_of[b]))
        return 1.0 if doc_of[a]["voice"] == doc_of[b]["voice"] else 0.0
    return similarity


def test_real_pairs_differ_only_in_voice(corpus):
    """Same-voice and different-voice pairs say the same texts at the same speeds: only the voice differs."""
    docs = _all_docs(corpus)
    seen = []
    result = pair_similarities(docs, {d["audio"]: d["audio"] for d in docs}, _recording_similarity(docs, seen))
    assert result["same_voice"] == 1.0 and result["different_voice"] == 0.0
    # every voice (3) x every single digit (2) in each set
    assert result["same_voice_pairs"] == result["different_voice_pairs"] == 6
    same = [(a, b) for a, b in seen if a["voice"] == b["voice"]]
    different = [(a, b) for a, b in seen if a["voice"] != b["voice"]]
    assert len(same) + len(different) == len(seen) == 12
    for a, b in seen:
        assert a["text"] == b["text"] and " " not in a["text"]  # one digit, both sides
        assert a["audio"] != b["audio"]
    # the same (text, speed, speed) combinations in both sets
    key = lambda pairs: sorted((a["text"], a["speed"], b["speed"]) for a, b in pairs)  # noqa: E731
    assert key(same) == key(different)


def test_prompt_references_match_the_generated_texts(corpus):
    """prompt <-> real: the prompt generation used, against the real planned digit at the prompt's speed, in the
    prompt's voice and in another voice."""
    docs = _all_docs(corpus)
    plan = [p for p in generation_plan(str(corpus)) if p["text"] in ("one", "two")]
    seen = []
    result = prompt_references(docs, plan, {d["audio"]: d["audio"] for d in docs}, _recording_similarity(docs, seen))
    assert result["training_voices"] == {"same_voice": 1.0, "different_voice": 0.0, "pairs": 4}
    assert result["heldout_voice"]["pairs"] == 2
    prompts = {p["voice_audio"] for p in plan}
    assert len(seen) == 2 * len(plan)
    for (prompt, real), item in zip(seen[::2], plan):
        assert prompt["audio"] == item["voice_audio"] and prompt["audio"] in prompts
        assert real["text"] == item["text"] and real["voice"] == item["voice"] and real["speed"] == prompt["speed"]
    for (prompt, real), item in zip(seen[1::2], plan):
        assert real["text"] == item["text"] and real["voice"] != item["voice"] and real["speed"] == prompt["speed"]
