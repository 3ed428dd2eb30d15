import json

import pytest
import soundfile as sf

from latentlm_mcore.data.prep.audio import load_audio
from latentlm_mcore.demo.speech_corpus import DIGITS, build_speech_corpus, digit_texts


def test_digit_texts_are_digit_words_and_unique():
    texts = digit_texts(12)
    assert texts[:10] == list(DIGITS) and len(set(texts)) == 22
    assert all(w in DIGITS for t in texts for w in t.split())


@pytest.mark.slow  # espeak-ng speaks the corpus: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_corpus_splits_and_audio(tmp_path):
    counts = build_speech_corpus(str(tmp_path), phrases=2, voices=("en-us", "en-gb"), heldout_voice="en-029",
                                 speeds=(175,))
    assert counts["heldout_voice"] == 12 and counts["train"] + counts["heldout"] == 24 and counts["heldout"] > 0
    train = [json.loads(l) for l in open(tmp_path / "train.jsonl")]
    held = [json.loads(l) for l in open(tmp_path / "heldout.jsonl")]
    voice = [json.loads(l) for l in open(tmp_path / "heldout_voice.jsonl")]
    assert {d["speaker"] for d in voice} == {"en-029"} and "en-029" not in {d["speaker"] for d in train}
    assert not {(d["speaker"], d["segments"][-2]["text"]) for d in train} & \
        {(d["speaker"], d["segments"][-2]["text"]) for d in held}
    doc = train[0]
    assert doc["source"] == "speech" and doc["segments"][-2]["text"] in digit_texts(2)
    # voice prompts: another utterance of the same voice in the same split, at most 3 s, not the next text
    assert sum(d["segments"][0]["voice"] == n["segments"][-1]["audio"] for d, n in zip(train, train[1:])) < len(train) // 2
    by_id = {d["segments"][-1]["audio"]: d for d in train}
    for d in train:
        prompt = d["segments"][0]
        assert by_id[prompt["voice"]]["speaker"] == d["speaker"] and prompt["voice"] != d["segments"][-1]["audio"]
        assert prompt["end"] - prompt["start"] <= 3.0
    seg = doc["segments"][-1]
    info = sf.info(tmp_path / seg["audio"])
    assert info.samplerate == 16000 and info.channels == 1
    assert abs(info.frames / 16000 - seg["end"]) < 1e-3 and 0.2 < seg["end"] < 3.0
    wav = load_audio(str(tmp_path / seg["audio"]), 16000)  # passes the preprocessing checks
    assert wav.abs().max() > 0.05
