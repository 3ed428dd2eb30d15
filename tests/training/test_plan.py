import pytest

from latentlm_mcore.config import get_preset
from latentlm_mcore.training.plan import plan_run


def test_mllm_1t_token_plan_by_hand():
    cfg = get_preset("mllm-1.3b")
    plan = plan_run(cfg, tokens=250_000 * 4096 * 1024, nodes=16, gpus_per_node=8, mfu=0.4, peak_tflops=989.0,
                    latent_fraction=0.0)
    assert plan.steps == 250_000 and plan.tokens_per_step == 4_194_304 and plan.gpus == 128
    h, f, L, v, s = 2048, 6144, 24, 100_288, 4096
    per_token = 6 * (L * (4 * h * h + 3 * h * f) + h * v) + 6 * 2 * L * s * h  # 6N + attention scores
    assert plan.flops_per_token == pytest.approx(per_token)
    assert plan.gpu_hours == pytest.approx(per_token * 250_000 * 4_194_304 / (0.4 * 989e12) / 3600)
    assert plan.wall_hours == pytest.approx(plan.gpu_hours / 128)


def test_latent_positions_add_diffusion_head_work():
    cfg = get_preset("mllm-1.3b")
    text = plan_run(cfg, 1e12, 16, 8, 0.4, 989.0, latent_fraction=0.0)
    mixed = plan_run(cfg, 1e12, 16, 8, 0.4, 989.0, latent_fraction=0.25)
    assert mixed.flops_per_token > text.flops_per_token * 1.02
