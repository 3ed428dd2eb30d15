import json
import random
from collections import Counter

import numpy as np
import soundfile as sf

from latentlm_mcore.data import schema
from latentlm_mcore.data.prep.convert_speech import add_voice_prompts, convert_libriheavy, convert_librispeech


def _wav(path, seconds=0.5, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(np.arange(int(seconds * rate)) * 0.05)).astype(np.float32), rate)


def test_librispeech_and_libritts_layouts(tmp_path):
    chap = tmp_path / "train" / "19" / "198"
    _wav(chap / "19-198-0000.flac", 0.5)
    _wav(chap / "19-198-0001.flac", 1.0)
    (chap / "19-198-0002.flac").write_text("not audio")
    (chap / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 SEVEN\n"
                                           "19-198-0002 BROKEN\n19-198-0003 MISSING FILE\n")
    tts = tmp_path / "train" / "84" / "121"
    _wav(tts / "84_121_000001_000000.wav", 0.25)
    (tts / "84_121_000001_000000.normalized.txt").write_text("A normalized sentence.")
    skipped = Counter()
    docs = list(convert_librispeech([str(tmp_path / "train")], skipped))
    assert [d["id"] for d in docs] == ["19-198-0000", "19-198-0001", "84_121_000001_000000"]
    # voice prompt: the speaker's next utterance in sorted order (the last takes the first), its first 3 s
    assert docs[0] == {"id": "19-198-0000", "source": schema.SPEECH_SOURCE, "speaker": "19",
                       "segments": [{"voice": "19/198/19-198-0001.flac", "start": 0.0, "end": 1.0},
                                    {"text": "HELLO WORLD"},
                                    {"audio": "19/198/19-198-0000.flac", "start": 0.0, "end": 0.5}]}
    assert docs[1]["segments"][0] == {"voice": "19/198/19-198-0000.flac", "start": 0.0, "end": 0.5}
    # a speaker with one utterance has no prompt (the preprocessing then uses the target's own first 3 s)
    assert docs[2]["speaker"] == "84" and docs[2]["segments"] == [
        {"text": "A normalized sentence."}, {"audio": "84/121/84_121_000001_000000.wav", "start": 0.0, "end": 0.25}]
    for d in docs:
        assert schema.parse_raw_line(json.dumps(d)).segments == d["segments"]
    assert skipped == Counter({schema.AUDIO_UNREADABLE: 1, schema.AUDIO_MISSING: 1})


def test_libriheavy_cuts_and_flat_lines(tmp_path):
    cut = {"id": "small/100/sea_fairies/0001", "start": 12.5, "duration": 3.25,
           "recording": {"id": "r", "sources": [{"type": "file", "source": "download/100/sea_fairies.flac"}]},
           "supervisions": [{"id": "s", "speaker": "100", "custom": {"texts": ["The sea, Trot.", "THE SEA TROT"]}}]}
    flat = {"id": "u2", "audio": "a/b.flac", "start": 0, "end": 2.0, "text": "seven two", "speaker": "7"}
    bad = {"id": "u3", "audio": "a/c.flac", "start": 3.0, "end": 1.0, "text": "backwards", "speaker": "7"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([json.dumps(cut), json.dumps(flat), json.dumps(bad), "{not json", '{"id": 1}']) + "\n")
    skipped = Counter()
    docs = list(convert_libriheavy([str(manifest)], skipped))
    assert docs[0]["segments"] == [{"text": "The sea, Trot."},
                                   {"audio": "download/100/sea_fairies.flac", "start": 12.5, "end": 15.75}]
    assert docs[0]["speaker"] == "100" and docs[1]["segments"][1] == {"audio": "a/b.flac", "start": 0.0, "end": 2.0}
    assert skipped == Counter({schema.INVALID_SCHEMA: 2, schema.INVALID_JSON: 1})


def test_libriheavy_voice_prompt_is_a_cut_of_the_same_speaker_at_most_3_s(tmp_path):
    lines = [{"id": f"u{i}", "audio": f"book{i % 2}.flac", "start": 10.0 * i, "end": 10.0 * i + d, "text": "x",
              "speaker": s} for i, (d, s) in enumerate([(5.0, "7"), (2.0, "8"), (1.5, "7"), (4.0, "8"), (2.5, "")])]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    docs = {d["id"]: d for d in convert_libriheavy([str(manifest)], Counter())}
    assert docs["u0"]["segments"][0] == {"voice": "book0.flac", "start": 20.0, "end": 21.5}  # u2: same speaker
    assert docs["u2"]["segments"][0] == {"voice": "book0.flac", "start": 0.0, "end": 3.0}  # u0, cut to 3 s
    assert docs["u1"]["segments"][0] == {"voice": "book1.flac", "start": 30.0, "end": 33.0}
    assert "voice" not in docs["u4"]["segments"][0]  # unknown speaker: no prompt


def _speaker_docs():
    return [{"id": f"{s}-{i:03d}", "speaker": s, "segments": [{"text": "x"}, {"audio": f"{s}/{i}.wav", "start": 0.0,
                                                                          "end": 1.0 + i / 10}]}
            for s in ("a", "b") for i in range(10)]


def test_seeded_voice_prompts_are_another_utterance_of_the_speaker_not_the_next_one():
    nxt = {d["id"]: d["segments"][0]["voice"] for d in add_voice_prompts(_speaker_docs())}
    assert nxt["a-003"] == "a/4.wav" and nxt["a-009"] == "a/0.wav"  # sorted order, the last takes the first
    picks = [{d["id"]: d["segments"][0] for d in add_voice_prompts(_speaker_docs(), rng=random.Random("s"))}
             for _ in range(2)]
    assert picks[0] == picks[1]  # the same seed, the same prompts: a rerun writes the same JSONL
    chosen = {i: p["voice"] for i, p in picks[0].items()}
    for doc_id, voice in chosen.items():
        speaker, index = doc_id.split("-")
        assert voice.startswith(speaker + "/") and voice != f"{speaker}/{int(index)}.wav"
    assert sorted(chosen.values()) == sorted(nxt.values())  # each utterance prompts one other
    assert sum(chosen[i] != nxt[i] for i in chosen) >= 10  # and mostly not the next one
    assert picks[0]["a-005"]["end"] == float(chosen["a-005"].split("/")[1].split(".")[0]) / 10 + 1.0
