"""scripts/tts_digits_demo.sh end to end at a tiny size (a few σ-VAE and tts-tiny steps): every output exists,
the report has its keys and no machine paths, and a rerun skips every stage."""
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes: the corpus, two trainings, 2-process launch, recognizer and speaker encoder

REPO = Path(__file__).resolve().parents[2]


def run_demo(out: Path, tmp: Path) -> str:
    env = dict(os.environ, TTS_DEMO_DIR=str(out), TTS_DEMO_PHRASES="2", TTS_DEMO_VAE_STEPS="4",
               TTS_DEMO_STEPS="4", TMPDIR=str(tmp))
    proc = subprocess.run(["bash", "scripts/tts_digits_demo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc.stdout


def test_tts_digits_demo_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "run"
    run_demo(out, tmp_path)
    report = json.loads((out / "report.json").read_text())
    for key in ("recognizer_real", "recognizer_reconstructed", "recognizer_generated", "speaker_similarity",
                "generated_stopped_by_eod", "audio_vae_steps", "tts_steps", "tokenizer_metrics"):
        assert key in report, key
    assert set(report["recognizer_generated"]) == {"training_voices", "heldout_voice"}
    assert report["recognizer_generated"]["training_voices"]["all"]["utterances"] == 40  # 4 voices x 10 digits
    assert report["recognizer_generated"]["heldout_voice"]["single_digits"]["utterances"] == 10
    assert 0 <= report["recognizer_real"]["all"]["utterance_accuracy"] <= 1
    sims = report["speaker_similarity"]
    assert set(sims["prompt_to_generated"]) == {"training_voices", "heldout_voice"}
    # every voice x digit, both sets alike (slow vs fast speed); prompt <-> real for every planned digit
    assert sims["real_pairs"]["same_voice_pairs"] == sims["real_pairs"]["different_voice_pairs"] == 50
    assert sims["prompt_to_real"]["training_voices"]["pairs"] == 40
    assert sims["prompt_to_real"]["heldout_voice"]["pairs"] == 10
    assert set(report["tokenizer_metrics"]) == {"mel_distance", "pesq_wb", "stoi"}
    diagnosis = report["diagnosis"]  # demo/tts_diagnosis.py on the trained model
    assert set(diagnosis["recognizer"]) == {"real", "reconstructed", "reconstructed_from_samples", "teacher_forced"}
    assert diagnosis["utterances"] > 0 and set(diagnosis["next_latent_mse"]) == {"teacher_forced", "previous_latent",
                                                                                 "other_utterance"}
    assert str(tmp_path) not in json.dumps(report)  # no machine paths
    assert (out / "mel.png").is_file() and len(list((out / "samples").glob("*.wav"))) == 50
    second = run_demo(out, tmp_path)
    for stage in second.split("=== [")[2:7]:  # corpus .. generation (the environment and report always run)
        assert "done already" in stage, stage
