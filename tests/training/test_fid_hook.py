"""The trainer's periodic FID hook (training/fid_hook.py): a class-conditional run at TP=2 on 2 processes with
`--eval-fid-every 2` logs a finite `fid` at steps 2 and 4 equal to tools/evaluate_images.py on the samples the
hook saved, and its losses equal those of the same run without the hook; runs it cannot score are refused
before they train, naming the flag."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from latentlm_mcore.config import RunConfig, get_preset
from tests.conftest import REPO, run_torchrun

PRETRAIN = REPO / "pretrain" / "pretrain_latentlm.py"
STEPS, EVERY, SAMPLES = 4, 2, 10


def digits(start: int, count: int) -> list[tuple[int, np.ndarray]]:
    """(label, 32x32 RGB uint8) of scikit-learn's handwritten digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(int(d.target[i]), np.asarray(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).convert("RGB")
                                          .resize((32, 32), Image.BILINEAR))) for i in range(start, start + count)]


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """(class dataset, reference .npz): 40 digits as class documents (classes:10, the tiny random σ-VAE: 16
    latents of dim 16), reference statistics of 20 other real digits."""
    import torch

    from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part
    from latentlm_mcore.evaluation.images import load_reference, save_reference
    from latentlm_mcore.evaluation.inception import InceptionV3
    from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE, save_sigma_vae

    root = tmp_path_factory.mktemp("fid_run")
    torch.manual_seed(0)
    save_sigma_vae(root / "vae.pt", SigmaVAE(SIGMA_VAE_PRESETS["tiny"]))
    (root / "images").mkdir()
    with open(root / "raw.jsonl", "w") as f:
        for i, (label, image) in enumerate(digits(0, 40)):
            Image.fromarray(image).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"d{i}", "source": "class", "label": label,
                                "segments": [{"image": f"{i}.png"}]}) + "\n")
    preprocess_part(PreprocessConfig(inputs=[str(root / "raw.jsonl")], output=str(root / "data"),
                                     image_root=str(root / "images"), vae_checkpoint=str(root / "vae.pt"),
                                     tokenizer="classes:10", progress=False))
    merge_parts(str(root / "data"), 1)
    reference = np.stack([image for _, image in digits(100, 20)])
    np.savez(root / "real.npz", arr_0=reference)
    torch.set_num_threads(1)
    save_reference(str(root / "reference.npz"), load_reference(str(root / "real.npz"), InceptionV3().eval()))
    return root / "data", root / "reference.npz"


def run_args(data, save, *extra) -> list:
    return ["--preset", "tiny", "--data", str(data), "--save", str(save), "--proportions", "class=1",
            "--model.vocab-size", 64, "--model.seq-length", 20, "--train.train-steps", STEPS,
            "--train.warmup-steps", 1, "--train.global-batch-size", 4, "--train.micro-batch-size", 2,
            "--parallel.tensor-parallel", 2, "--log-interval", 1, "--save-interval", 100, "--num-workers", 0,
            "--tensorboard", "false", *extra]


def records(save, split: str) -> list[dict]:
    return [r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
def test_fid_hook_at_tp2_logs_the_tools_fid_and_leaves_the_losses_alone(class_run, tmp_path):
    data, reference = class_run
    hooked, plain = tmp_path / "hooked", tmp_path / "plain"
    run_torchrun(PRETRAIN, 2, run_args(data, hooked, "--eval-fid-every", EVERY, "--fid-reference", reference,
                                       "--fid-num-samples", SAMPLES), tmp_path)
    run_torchrun(PRETRAIN, 2, run_args(data, plain), tmp_path)

    fids = records(hooked, "eval")
    assert [r["iteration"] for r in fids] == [2, 4]
    for r in fids:
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and r["num_images"] == SAMPLES
        samples = hooked / "fid" / f"iter_{r['iteration']:07d}.npz"
        with np.load(samples) as saved:
            assert saved["arr_0"].shape == (SAMPLES, 32, 32, 3) and saved["arr_0"].dtype == np.uint8
            assert saved["labels"].tolist() == [i % 10 for i in range(SAMPLES)]
        out = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate_images.py"), "--images", str(samples),
                              "--reference", str(reference)], capture_output=True, text=True, cwd=REPO, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        tool = json.loads(out.stdout[out.stdout.index("{"):])
        assert abs(tool["fid"] - r["fid"]) <= 1e-3, (tool, r)
        assert abs(tool["precision"] - r["precision"]) <= 1e-9 and abs(tool["recall"] - r["recall"]) <= 1e-9
    with np.load(hooked / "fid" / "iter_0000002.npz") as a, np.load(hooked / "fid" / "iter_0000004.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"]), "the samples come from the live model, which trained on"

    # the evaluation changed nothing of the training: the same losses, step for step, bit for bit
    keys = ("loss", "lm_loss", "diffusion_loss", "grad_norm")
    want = [[r[k] for k in keys] for r in records(plain, "train")]
    assert len(want) == STEPS and [[r[k] for k in keys] for r in records(hooked, "train")] == want


def test_runs_the_hook_cannot_score_are_refused_naming_the_flag(tmp_path, tiny_dataset):
    from latentlm_mcore.training.fid_hook import FIDEvaluation

    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="--eval-fid-every needs --fid-reference"):
        FIDEvaluation(RunConfig(eval_fid_every=2), cfg)
    reference = tmp_path / "ref.npz"
    reference.write_bytes(b"")
    with pytest.raises(ValueError, match="--fid-use-ema: this run keeps no EMA"):
        FIDEvaluation(RunConfig(eval_fid_every=2, fid_reference=str(reference), fid_use_ema=True), cfg)
    hook = FIDEvaluation(RunConfig(eval_fid_every=2, fid_reference=str(reference), data=str(tiny_dataset)), cfg)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())  # a text-and-image run (cl100k_base)
    with pytest.raises(ValueError, match="--eval-fid-every: class-to-image samples need a class-conditional run"):
        hook.on_fit_start(SimpleNamespace(data=SimpleNamespace(manifest=manifest)))
