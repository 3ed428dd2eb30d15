"""Text -> speech from a model pretrained on real speech shards (the speech_dataset fixture: espeak-ng digits through
the real preprocessing): the checkpoint's provenance finds the audio σ-VAE by its hash, tools/generate.py writes a
WAV per prompt in a voice from the held-out speaker, and the JSON says what it made."""
import json

import pytest
import soundfile as sf

from tests.conftest import REPO, run_torchrun
from tests.hf.test_export import run_tool

pytestmark = pytest.mark.slow  # a 2-process pretraining run and a generation: about a minute


def test_generate_speech_from_a_pretrained_checkpoint(speech_dataset, tmp_path):
    save = tmp_path / "ckpt"
    run_torchrun(REPO / "pretrain" / "pretrain_latentlm.py", 2,
                 ["--preset", "tiny", "--data", str(speech_dataset.mds), "--save", str(save), "--train.train-steps", 4,
                  "--train.warmup-steps", 1, "--train.global-batch-size", 2, "--train.micro-batch-size", 1,
                  "--parallel.tensor-parallel", 2, "--log-interval", 1, "--save-interval", 4, "--num-workers", 0,
                  "--tensorboard", "false", "--proportions", "speech=1"], tmp_path)
    heldout = [json.loads(line) for line in (speech_dataset.corpus / "heldout_voice.jsonl").read_text().splitlines()]
    voice = speech_dataset.corpus / heldout[0]["segments"][-1]["audio"]
    (tmp_path / "tmp").mkdir(exist_ok=True)
    run_tool("generate.py", ["--checkpoint", str(save), "--task", "text-to-speech", "--prompt", "seven two",
                             "--prompt", "nine", "--voice", str(voice), "--max-seconds", "0.5",
                             "--output", str(tmp_path / "out")], tmp_path / "tmp")
    records = json.loads((tmp_path / "out" / "speech.json").read_text())
    assert [r["text"] for r in records] == ["seven two", "nine"] and all(r["voice"] == str(voice) for r in records)
    for i, r in enumerate(records):
        wav, rate = sf.read(tmp_path / "out" / f"{i}.wav")
        assert rate == 16000 and len(wav) == r["num_latents"] * 400  # the tiny σ-VAE: 16 kHz, hop 400
        assert 1 <= r["num_latents"] <= 20 and r["stopped_by"] in ("eod", "max")
        assert r["stopped_by"] == "eod" or r["num_latents"] == 20  # 0.5 s at 40 Hz
