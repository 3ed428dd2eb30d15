"""The loss is token-level over the global batch (paper §2.2): the same 4 sequences cut into 1x4, 2x2 or
4x1 micro-batches, or over DP=2 (one rank without any latent), give the loss and gradients of
L = sum CE / N_LM + alpha * sum diffusion / N_Diff computed by hand over the whole batch."""
from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

WORKER = Path(__file__).with_name("loss_reduction_worker.py")
RTOL = 1e-5
CUTS = ["1x4", "2x2", "4x1", "dp2_2x1", "dp2_1x2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_reduction")
    run_torchrun(WORKER, 1, ["--phase", "splits", "--out", str(out)], out)
    run_torchrun(WORKER, 2, ["--phase", "dp", "--out", str(out)], out)
    results = torch.load(out / "splits.pt", weights_only=False)
    results.update(torch.load(out / "dp.pt", weights_only=False))
    return results


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale > 0 else (a - b).norm().item()


@pytest.mark.parametrize("cut", CUTS)
def test_loss_and_gradients_do_not_depend_on_the_cut(runs, cut):
    want, got = runs["by_hand"], runs[cut]
    for key in ("loss", "lm_loss", "diffusion_loss"):
        assert got[key] == pytest.approx(want[key], rel=RTOL), key
    assert (got["lm_targets"], got["diffusion_targets"]) == (want["lm_targets"], want["diffusion_targets"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, ref in want["grads"].items():
        err = relative_error(got["grads"][name], ref)
        assert err <= RTOL, f"{name}: relative error {err:.2e}"


def test_the_batch_tells_token_level_from_micro_batch_means(runs):
    """The check above can fail: averaging per-micro-batch means (the reduction before the token-level
    loss) gives other values for this batch, and the head and backbone all receive gradient."""
    want, seqs = runs["by_hand"], runs["by_hand"]["per_sequence"]
    assert want["diffusion_loss"] > 0 and want["diffusion_targets"] == 3 * 6
    for size in (1, 2):
        groups = [seqs[i:i + size] for i in range(0, len(seqs), size)]
        lm = sum(sum(s["lm_sum"] for s in g) / sum(s["lm_targets"] for s in g) for g in groups) / len(groups)
        diff = sum(sum(s["diffusion_sum"] for s in g) / max(sum(s["diffusion_targets"] for s in g), 1)
                   for g in groups) / len(groups)
        assert abs(lm - want["lm_loss"]) > 100 * RTOL * want["lm_loss"], size
        assert abs(diff - want["diffusion_loss"]) > 100 * RTOL * want["diffusion_loss"], size
    head = {k: v for k, v in want["grads"].items() if k.startswith("diffusion_head.")}
    assert head and all(v.norm() > 0 for v in head.values())
