"""`tools/convert_ckpt_to_hf.py --use-ema` on a TP=2 checkpoint with an EMA of the weights (loaded at TP=1 in
the converter's process): the folder holds the checkpoint's EMA tensors, not the raw weights; a checkpoint
without an EMA is refused by name."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, ema_run_args, run_torchrun
from tests.training.test_resume import checkpoint_tensors

CONVERT = REPO / "tools" / "convert_ckpt_to_hf.py"
PREFIX = "callbacks.ema."
# the checkpoint's fused-norm names (the local spec writes TE's) -> the model's own state-dict names
NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
         "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def convert(checkpoint, output, *extra):
    return subprocess.run([sys.executable, str(CONVERT), "--checkpoint", str(checkpoint), "--output", str(output), *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def model_state(stored: dict, prefix: str) -> dict:
    """The TP=1 model state dict held in a checkpoint under `prefix`: layer-stacked tensors split per layer."""
    out = {}
    for key, tensor in stored.items():
        if not key.startswith(prefix) or key.startswith(prefix + "optimizer"):
            continue
        name = key[len(prefix):]
        if name.startswith("decoder.layers."):
            rest = name[len("decoder.layers."):]
            for i, layer in enumerate(tensor):
                out[f"decoder.layers.{i}.{NORMS.get(rest, rest)}"] = layer
        else:
            out[name] = tensor
    return out


def hf_tensors(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "sigma_vae.safetensors":
            out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def exports(ema_run, tmp_path_factory):
    """The run's checkpoint exported with and without --use-ema (and a σ-VAE with latent statistics: the tiny
    dataset's random one has none, which an export needs)."""
    from latentlm_mcore.vae import SIGMA_VAE_PRESETS, LatentStats, SigmaVAE, save_sigma_vae

    tmp = tmp_path_factory.mktemp("ema_exports")
    torch.manual_seed(0)
    save_sigma_vae(tmp / "vae.pt", SigmaVAE(SIGMA_VAE_PRESETS["tiny"]), LatentStats(torch.zeros(16), torch.ones(16)))
    for name, extra in (("ema", ["--use-ema"]), ("raw", [])):
        proc = convert(ema_run, tmp / name, "--sigma-vae", str(tmp / "vae.pt"), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.slow  # the session ema_run fixture trains at TP=2 under torchrun: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_use_ema_exports_the_ema_tensors_and_not_the_raw_weights(ema_run, exports, tmp_path):
    from latentlm_mcore.config import get_preset
    from latentlm_mcore.hf.convert import megatron_to_hf_state_dict

    stored = checkpoint_tensors(ema_run / "iter_0000006", tmp_path)
    model = get_preset("tiny").model
    want_ema = megatron_to_hf_state_dict(model_state(stored, PREFIX), model)
    want_raw = megatron_to_hf_state_dict({k: v for k, v in model_state(stored, "").items()
                                          if not k.startswith(("callbacks.", "optimizer."))}, model)
    ema, raw = hf_tensors(exports / "ema"), hf_tensors(exports / "raw")
    assert ema.keys() == want_ema.keys() == raw.keys() == want_raw.keys()
    for k in want_ema:
        assert torch.equal(ema[k], want_ema[k]), f"{k}: --use-ema must export the EMA"
        assert torch.equal(raw[k], want_raw[k]), f"{k}: without --use-ema the raw weights"
    differ = [k for k in ema if not torch.equal(ema[k], raw[k])]
    assert len(differ) > len(ema) // 2, "after 6 steps at decay 0.8 most EMA tensors differ from the weights"


def generate(source: list, output) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), *source, "--task", "text-to-image",
                           "--prompt", "a handwritten digit seven", "--cfg-scale", "2", "--diffusion-steps", "4",
                           "--output", str(output)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"samples": json.loads((output / "samples.json").read_text()),
            "image": np.asarray(Image.open(output / "images" / "000.png"), dtype=np.int16)}


@pytest.mark.slow  # the session ema_run fixture trains at TP=2 under torchrun: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_generate_use_ema_from_the_checkpoint_equals_the_ema_export(ema_run, exports, tmp_path):
    megatron = generate(["--checkpoint", str(ema_run), "--sigma-vae", str(exports / "vae.pt"), "--use-ema"],
                        tmp_path / "megatron")
    hf = generate(["--hf", str(exports / "ema")], tmp_path / "hf")
    raw = generate(["--checkpoint", str(ema_run), "--sigma-vae", str(exports / "vae.pt")], tmp_path / "raw")
    assert megatron["samples"][0]["tokens"] == hf["samples"][0]["tokens"]
    assert np.abs(megatron["image"] - hf["image"]).max() <= 1  # grey levels, as tests/hf/test_export.py
    assert np.abs(megatron["image"] - raw["image"]).max() > 1, "the EMA and the raw weights draw other images"


@pytest.mark.slow  # trains under torchrun
def test_use_ema_on_a_checkpoint_without_one_is_refused(tiny_dataset, tmp_path):
    save = tmp_path / "plain"
    args = ema_run_args(tiny_dataset, save, "--train.ema-decay", 0, "--train.train-steps", 3, tp=1)
    run_torchrun(REPO / "pretrain" / "pretrain_latentlm.py", 1, args, tmp_path)
    proc = convert(save, tmp_path / "out", "--use-ema")
    assert proc.returncode != 0
    assert "holds no EMA of the weights (trained with train.ema_decay 0)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
