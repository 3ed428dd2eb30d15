"""The memory planner (training/memory.py) against three independent references: the architecture's
parameter count (config.count_parameters), what real ranks of a TP=2 x PP=2 x DP=2 layout allocate, and
Megatron-LM's own formula; plus its activation formula against torch's memory tracker on CPU."""
import json
from pathlib import Path

import pytest

from latentlm_mcore.config import count_parameters, get_preset
from latentlm_mcore.training.memory import Layout, activation_bytes, rank_states
from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("memory_worker.py")


def replicated_over_tp(m) -> int:
    """Parameters every TP rank holds whole: RMSNorm weights, the latent projection, the diffusion head."""
    return 2 * m.hidden_size * m.num_layers + m.hidden_size + m.latent_dim * m.hidden_size + \
        count_parameters(m)["diffusion_head"]


@pytest.mark.parametrize("tp,pp,vpp", [(1, 4, None), (2, 4, None), (4, 2, 3), (8, 8, 3)])
def test_meta_rank_params_sum_to_count_parameters(tp, pp, vpp):
    m = get_preset("mllm-1.3b").model
    states = rank_states(m, Layout(tp, pp, dp=2, vpp=vpp), stages={f"pp{r}": r for r in range(pp)})
    per_replica = sum(s.params for s in states) * tp - (tp - 1) * replicated_over_tp(m)
    assert per_replica == count_parameters(m)["total"]


def megatron_lm_weight_and_optimizer_bytes(m, tp, pp, dp, distributed_optimizer=True) -> float:
    """Independent transcription of Megatron-LM megatron/training/theoretical_memory_usage.py,
    compute_weight_and_optimizer_memory (dense GPT, SwiGLU, untied embeddings): the most loaded shard
    (first stage: 1/PP of the layers + the embedding, all over TP) x (6 + 12/DP) bytes per parameter."""
    groups = m.num_query_groups or m.num_attention_heads
    query_ratio = m.kv_channels * m.num_attention_heads / m.hidden_size
    layers = 2 * m.num_layers * m.hidden_size * m.hidden_size * (
        (1 + groups / m.num_attention_heads) * query_ratio
        + (m.ffn_hidden_size / m.hidden_size) * 3 / 2
        + 2 / m.hidden_size
        + 1 / (m.num_layers * m.hidden_size))
    embedding = m.hidden_size * m.vocab_size
    most_loaded = (layers / pp + embedding) / tp
    if pp == 1:
        most_loaded += embedding / tp  # untied output layer
    per_param = 6 + 12 / dp if distributed_optimizer else 18
    return most_loaded * per_param


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 8), (1, 4, 32), (8, 1, 16)])
def test_first_stage_within_half_a_percent_of_megatron_lm_formula(tp, pp, dp):
    """Where ours differs: the latent projection (first stage) and the diffusion head (last stage) are ours
    alone; norms are whole on every TP rank (the formula divides them by TP); DDP pads each bucket to a
    multiple of DP. The first stage differs by those small terms only; the last by the head (checked too)."""
    m = get_preset("mllm-1.3b").model
    states = {s.stage: s for s in rank_states(m, Layout(tp, pp, dp))}
    first = states["only" if pp == 1 else "first"]
    formula = megatron_lm_weight_and_optimizer_bytes(m, tp, pp, dp)
    head_bytes = count_parameters(m)["diffusion_head"] * (6 + 12 / dp)
    if pp == 1:
        formula += head_bytes
    assert first.total_bytes == pytest.approx(formula, rel=5e-3)
    if pp > 1:
        # the last stage: the same layers and an output layer the embedding's size, plus the diffusion head
        # (not in the formula) whole on every TP rank
        assert states["last"].total_bytes - head_bytes == pytest.approx(formula, rel=5e-3)


def test_distributed_optimizer_shards_over_dp_exactly():
    m = get_preset("mllm-1.3b").model
    one, many = rank_states(m, Layout(1, 1, 1))[0], rank_states(m, Layout(1, 1, 64))[0]
    assert one.params == many.params == count_parameters(m)["total"]
    assert one.optimizer_bytes == 12 * one.params
    assert many.optimizer_bytes == pytest.approx(12 * one.params / 64, rel=1e-4)
    assert many.grad_bytes >= 4 * many.params and many.param_bytes >= 2 * many.params  # + bucket padding


@pytest.mark.slow
def test_planned_bytes_equal_what_real_ranks_allocate(tmp_path):
    run_torchrun(WORKER, 8, ["--tp", "2", "--pp", "2", "--out", str(tmp_path)], tmp_path)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 8 and {r["pp_rank"] for r in results} == {0, 1}
    for r in results:
        assert r["planned"] == r["real"], r["rank"]


@pytest.fixture
def one_process_group():
    from latentlm_mcore.config import ParallelConfig
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    init_distributed(ParallelConfig())
    yield
    shutdown_distributed()


@pytest.mark.parametrize("hidden,seq,mbs,recompute", [(128, 256, 1, None), (256, 512, 2, "selective"),
                                                      (192, 384, 1, "full")])
@pytest.mark.slow
def test_activation_formula_within_15_percent_of_measured(one_process_group, hidden, seq, mbs, recompute):
    """bench/memory_activations.py runs the whole grid; here three points, one per recompute mode (192 x 384:
    a shape outside that grid)."""
    from latentlm_mcore.config import ModelConfig
    from latentlm_mcore.training.memory_measure import measure_activations

    m = ModelConfig(num_layers=2, hidden_size=hidden, ffn_hidden_size=3 * hidden, num_attention_heads=4,
                    vocab_size=2048, seq_length=seq, latent_dim=16, head_layers=2)
    measured = measure_activations(m, mbs, recompute, latent_fraction=0.25)["forward_end"]
    estimate = activation_bytes(m, mbs, recompute=recompute, latent_fraction=0.25, flash_attention=False)
    assert estimate == pytest.approx(measured, rel=0.15)
