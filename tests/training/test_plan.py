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


def test_plan_run_lists_fitting_layouts_and_prints_pretrain_arguments(capsys):
    """tools/plan_run.py --gpu-memory: fitting layouts, fastest first, and a chosen layout whose arguments the
    pretraining entry point's parser accepts and turns into that layout."""
    import argparse
    import importlib.util
    from pathlib import Path

    from latentlm_mcore.config import ParallelConfig, RunConfig, TrainConfig
    from latentlm_mcore.runtime.cli import add_config_arguments, apply_overrides, config_overrides

    path = Path(__file__).resolve().parents[2] / "tools" / "plan_run.py"
    spec = importlib.util.spec_from_file_location("plan_run", path)
    plan_run_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_run_tool)
    plan_run_tool.main(["--preset", "tiny", "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "1"])
    out = capsys.readouterr().out
    rows = out[out.index(" TP  PP"):out.index("chosen:")].strip().splitlines()[1:]
    steps = [float(r.split()[-1]) for r in rows]
    assert rows and steps == sorted(steps)
    assert all(float(r.split()[-2]) <= 0.9 for r in rows)  # total GiB within the 10%-reserve budget
    chosen = out[out.index("chosen:"):].split("slurm/pretrain_mllm_1.3b.sh", 1)[1].split()
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RunConfig)
    add_config_arguments(parser, TrainConfig, "train.")
    add_config_arguments(parser, ParallelConfig, "parallel.")
    args = parser.parse_args(chosen)
    first = rows[0].split()
    cfg = apply_overrides(get_preset("tiny"), {f"parallel.{k}": v for k, v in config_overrides(args, "parallel.").items()})
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (int(first[0]), int(first[1]))


def test_plan_and_loader_agree_on_the_mixture(tiny_dataset, tmp_path, monkeypatch, capsys):
    """Issue 11 item 6: tools/plan_run.py --data takes the latent fraction from the manifests with the
    loader's own weights; the fraction of latents the loader then delivers matches it."""
    import json
    import sys
    import tempfile
    from pathlib import Path

    import numpy as np

    from latentlm_mcore.data.loader.packed import LoaderConfig, PackedLoader
    from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture
    from latentlm_mcore.training.plan import mixture_latent_fraction

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    proportions = {"text": 2.0, "pair": 1.0, "interleaved": 1.0}
    planned = {unit: mixture_latent_fraction(str(tiny_dataset), proportions, unit) for unit in ("tokens", "documents")}
    assert planned["tokens"] > planned["documents"] + 0.05, planned  # token shares give the short pairs their due
    mixture = StreamMixture(MixtureConfig(dataset_root=str(tiny_dataset), proportions=proportions))
    loader = iter(PackedLoader(mixture, LoaderConfig(seq_length=128, micro_batch_size=4)))
    latents = tokens = 0
    for _ in range(60):
        batch = next(loader)
        latents += int(batch["latent_mask"].sum())
        tokens += int((batch["tokens"] != mixture.ids.pad).sum())
    assert latents / tokens == pytest.approx(planned["tokens"], abs=0.04), (latents / tokens, planned)

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import plan_run as plan_run_tool

    capsys.readouterr()
    plan_run_tool.main(["--preset", "tiny", "--data", str(tiny_dataset), "--json"])
    by_data = json.loads(capsys.readouterr().out)
    plan_run_tool.main(["--preset", "tiny", "--latent-fraction", str(planned["tokens"]), "--json"])
    assert by_data == json.loads(capsys.readouterr().out)
    assert np.isfinite(by_data["flops_per_token"])


def test_selective_recompute_costs_the_mlp_forward_and_drops_its_swiglu_tensors():
    """Selective recompute (the MLP; TE's fused attention is not recomputed): one more MLP forward per step,
    and per layer the 10 bytes per ffn element of the SwiGLU tensors (fc1 out, silu(gate), product) are gone."""
    from latentlm_mcore.training.layouts import step_seconds
    from latentlm_mcore.training.memory import Layout, activation_bytes

    cfg = get_preset("mllm-1.3b")
    h, f, L, v, s = 2048, 6144, 24, 100_288, 4096
    forward = 2 * (s * (L * (4 * h * h + 3 * h * f) + h * v) + L * 2 * s * s * h)
    mlp_forward = 2 * s * L * 3 * h * f
    none, selective, full = (step_seconds(cfg, Layout(1, 1, 128), 1, r, 0.0, 989.0, 0.4)
                             for r in (None, "selective", "full"))
    assert selective / none == pytest.approx((3 * forward + mlp_forward) / (3 * forward))
    assert none < selective < full
    saved = activation_bytes(cfg.model, 2, tp=2, sp=True) - activation_bytes(cfg.model, 2, tp=2, sp=True,
                                                                              recompute="selective")
    assert saved == pytest.approx(L * 10 * f * s * 2 / 2)


def test_layout_search_takes_selective_recompute_when_no_recompute_does_not_fit():
    """8 GPUs for mllm-1.3b, a GPU just too small for every plan without recompute: the best fitting plan
    recomputes selectively (cheaper than full), and at every layout and micro-batch selective holds less than
    none and more than full."""
    from latentlm_mcore.training.layouts import search_layouts

    cfg = get_preset("mllm-1.3b")
    _, plans = search_layouts(cfg, 8, 8, 1e6, 989.0, 0.4, 0.25, micro_batch_sizes=(1,))
    by_recompute = {}
    for p in plans:
        by_recompute.setdefault((p.layout, p.micro_batch_size), {})[p.recompute] = p
    assert all(r[None].activation_gib > r["selective"].activation_gib > r["full"].activation_gib
               for r in by_recompute.values())
    too_small = min(p.total_gib for p in plans if p.recompute is None) * 0.999 / 0.9
    fitting, _ = search_layouts(cfg, 8, 8, too_small, 989.0, 0.4, 0.25, micro_batch_sizes=(1,))
    assert fitting and fitting[0].recompute == "selective"
