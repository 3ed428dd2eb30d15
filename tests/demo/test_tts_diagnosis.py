"""The TTS diagnosis (demo/tts_diagnosis.py): its latent statistics against numpy, and on a speech checkpoint the
hidden states it samples teacher-forced latents from are those generation's decoder gives for the same prefixes."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from latentlm_mcore.demo.tts_diagnosis import lag1_correlation
from tests.conftest import REPO, run_torchrun


def test_lag1_correlation_is_numpys_pooled_over_runs():
    rng = np.random.default_rng(0)
    runs = []
    for n in (40, 57, 33):  # AR(1) with coefficient 0.8 in channel 0, independent draws in channel 1
        x = np.zeros((n, 2))
        for t in range(1, n):
            x[t, 0] = 0.8 * x[t - 1, 0] + rng.normal()
        x[:, 1] = rng.normal(size=n)
        runs.append(torch.tensor(x, dtype=torch.float32))
    pairs = [np.concatenate([r[:-1].numpy() for r in runs]), np.concatenate([r[1:].numpy() for r in runs])]
    want = np.mean([np.corrcoef(pairs[0][:, c], pairs[1][:, c])[0, 1] for c in range(2)])
    assert lag1_correlation(runs) == pytest.approx(want, abs=1e-3)
    assert lag1_correlation([r[:, :1] for r in runs]) > 0.6 and abs(lag1_correlation([r[:, 1:] for r in runs])) < 0.2


HIDDEN_CHECK = textwrap.dedent("""
    import sys, torch
    from latentlm_mcore.demo.tts_diagnosis import hidden_before_latents
    from latentlm_mcore.inference.generation import _flatten, _left_pad, speech_prompts
    from latentlm_mcore.inference.tasks import Generator

    gen = Generator.from_megatron(sys.argv[1], use_cache=False)
    torch.manual_seed(0)
    voice, z = torch.randn(6, gen.decoder.latent_dim), torch.randn(5, gen.decoder.latent_dim)
    cond, uncond = speech_prompts([gen.tokenizer.encode("seven two")], [voice], gen.special)
    forced = hidden_before_latents(gen.decoder, [cond[0], uncond[0]], z)
    worst = 0.0
    for row, prompt in enumerate([cond[0], uncond[0]]):
        for k in range(len(z)):  # generation's path: the prefix up to latent k, its last position's hidden state
            gen.decoder.start(64)
            ids, lat, mask, att = _left_pad([_flatten(prompt) + list(z[:k])], gen.decoder.latent_dim)
            _, last = gen.decoder.step(ids, lat, mask, att)
            worst = max(worst, float((forced[row, k] - last[0]).abs().max()))
    print("WORST", worst, float(forced.abs().max()))
""")


@pytest.mark.slow  # a 2-process pretraining run, then the diagnosis: about a minute and a half
def test_diagnosis_of_a_speech_checkpoint(speech_dataset, tmp_path):
    save = tmp_path / "ckpt"
    run_torchrun(REPO / "pretrain" / "pretrain_latentlm.py", 2,
                 ["--preset", "tiny", "--data", str(speech_dataset.mds), "--save", str(save), "--train.train-steps", 2,
                  "--train.warmup-steps", 1, "--train.global-batch-size", 2, "--train.micro-batch-size", 1,
                  "--log-interval", 1, "--save-interval", 2, "--num-workers", 0, "--tensorboard", "false",
                  "--proportions", "speech=1"], tmp_path)
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    (tmp_path / "check.py").write_text(HIDDEN_CHECK)
    check = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(save)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-5000:]
    worst, scale = map(float, next(l for l in check.stdout.splitlines() if l.startswith("WORST")).split()[1:])
    assert worst < 1e-4 * max(scale, 1.0), f"teacher-forced hidden states differ from generation's by {worst}"

    out = tmp_path / "diagnosis.json"
    proc = subprocess.run([sys.executable, "-m", "latentlm_mcore.demo.tts_diagnosis", "--checkpoint", str(save),
                           "--corpus", str(speech_dataset.corpus), "--output", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    d = json.loads(out.read_text())
    assert d["utterances"] > 0 and d["checkpoint_iteration"] == "iter_0000002"
    for kind in ("real", "reconstructed", "reconstructed_from_samples", "teacher_forced"):
        assert 0 <= d["recognizer"][kind]["all"]["utterance_accuracy"] <= 1
    mse = d["next_latent_mse"]
    assert all(v > 0 for v in mse.values())
    assert 0 < d["latents"]["mu_share_of_sample_variance"] <= 1 and d["latents"]["frame_rate"] == 40

    train = tmp_path / "diagnosis_train.json"  # the utterances training saw, at most 3, evenly through the split
    proc = subprocess.run([sys.executable, "-m", "latentlm_mcore.demo.tts_diagnosis", "--checkpoint", str(save),
                           "--corpus", str(speech_dataset.corpus), "--output", str(train), "--split", "train",
                           "--max-utterances", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    t = json.loads(train.read_text())
    assert (t["split"], t["utterances"], d["split"]) == ("train", 3, "heldout")
    assert t["recognizer"]["real"]["all"]["utterances"] == 3
