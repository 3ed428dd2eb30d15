"""Parallel layouts equal the one-process run: TP=2 (SP off / on), PP=2 (1F1B, 4 micro-batches) and
DP=2 with the distributed optimizer (also with overlapped grad reduce / param gather), over 3 optimizer steps, on a batch holding text and latents
(and TP=2 on packed speech batches, whose LM loss also counts the stop targets at latent positions);
and a distributed checkpoint saved at TP=2 loads at TP=1 and PP=2 with the same outputs."""
from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

WORKER = Path(__file__).with_name("parity_worker.py")
RTOL = 1e-5
LAYOUTS = ["tp2", "tp2_sp", "pp2", "dp2_distopt", "dp2_distopt_overlap", "tp2_speech"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    run_torchrun(WORKER, 2, ["--phase", "layouts", "--out", str(out)], out)
    run_torchrun(WORKER, 1, ["--phase", "reference", "--out", str(out)], out)
    layouts = torch.load(out / "layouts.pt", weights_only=False)
    references = torch.load(out / "reference.pt", weights_only=False)
    return layouts, references["reference"], references["reference_speech"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    diff, scale = (a - b).norm().item(), b.norm().item()
    return diff / scale if scale > 0 else diff


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_gradients_and_updates_match_one_process(runs, layout):
    layouts, reference, speech_reference = runs
    if layout == "tp2_speech":  # speech documents: CE at latent positions (stop targets), varying run lengths
        reference = speech_reference
    steps, ref_steps = layouts[layout]["steps"], reference["steps"]
    assert len(steps) == len(ref_steps) == 3
    for i, (got, want) in enumerate(zip(steps, ref_steps)):
        assert got["update_ok"] and want["update_ok"]
        for key in ("loss", "lm_loss", "diffusion_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=RTOL), f"step {i} {key}"
        assert want["diffusion_loss"] > 0, "the batch must exercise the diffusion head"
        assert got["grads"].keys() == want["grads"].keys()
        for kind in ("grads", "params"):
            for name, ref in want[kind].items():
                assert got[kind][name].shape == ref.shape, f"step {i} {kind} {name}"
                err = relative_error(got[kind][name], ref)
                assert err <= RTOL, f"step {i} {kind} {name}: relative error {err:.2e}"


def test_diffusion_head_gradients_are_exercised(runs):
    _, reference, _ = runs
    last = reference["steps"][-1]["grads"]
    head = {k: v for k, v in last.items() if k.startswith("diffusion_head.")}
    assert head and sum(v.norm().item() > 0 for v in head.values()) == len(head), \
        "after AdaLN-Zero's first step every head parameter must receive gradient"


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2"])
def test_diffusion_head_is_replicated_not_sharded(runs, layout):
    layouts, _, _ = runs
    assert layouts[layout]["head_replicated"]


@pytest.mark.parametrize("loader", ["reference", "pp2"])
def test_tp2_checkpoint_loads_at_other_layouts(runs, loader):
    layouts, reference, _ = runs
    saved = layouts["tp2"]["eval_trained"]
    loaded = reference["eval_trained"] if loader == "reference" else layouts["pp2"]["eval_trained"]
    for key in ("lm_loss", "diffusion_loss"):
        assert loaded[key] == pytest.approx(saved[key], rel=1e-6), key
