"""The start-up line says what a run runs; a run that asks for what the machine or layout cannot do is
refused before training with a message naming the missing piece. Machines are described, not probed,
so every rule runs here against an H100, a Blackwell part, an A100 and a CPU."""
import subprocess
import sys
from dataclasses import replace

import pytest

from latentlm_mcore.config import RunConfig, apply_overrides, get_preset
from latentlm_mcore.training.preflight import (Machine, PreflightError, check_pretrain, check_sigma_vae,
                                               describe_pretrain, describe_sigma_vae, layer_spec, probe_machine)
from latentlm_mcore.training.trainer import numerics_overrides
from tests.conftest import REPO

CPU = Machine(transformer_engine_error="no GPU")
H100_TE = Machine(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), gpus=8, bf16=True, transformer_engine="2.8.0")
H100_NO_TE = replace(H100_TE, transformer_engine=None, transformer_engine_error="ImportError: libcudnn.so.9")
B200_TE = Machine(gpu="NVIDIA B200", capability=(10, 0), gpus=8, bf16=True, transformer_engine="2.8.0")
A100_TE = Machine(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0), gpus=8, bf16=True, transformer_engine="2.8.0")
V100 = Machine(gpu="Tesla V100-SXM2-32GB", capability=(7, 0), gpus=8, bf16=False, transformer_engine_error="x")


def refused(cfg, run, machine, world=1) -> str:
    with pytest.raises(PreflightError) as e:
        check_pretrain(cfg, run, machine, world)
    return str(e.value)


def test_fp8_without_a_gpu_is_refused():
    assert "--fp8 hybrid needs a GPU" in refused(get_preset("tiny"), RunConfig(fp8="hybrid"), CPU)


def test_fp8_without_transformer_engine_is_refused_naming_the_import_error():
    message = refused(get_preset("mllm-1.3b"), RunConfig(fp8="e4m3"), H100_NO_TE, world=8)
    assert "needs Transformer Engine" in message and "libcudnn.so.9" in message and "local layer spec" in message


def test_mxfp8_needs_blackwell():
    cfg, run = get_preset("mllm-1.3b"), RunConfig(fp8="hybrid", fp8_recipe="mxfp8")
    assert "Blackwell" in refused(cfg, run, H100_TE, world=8) and "9.0" in refused(cfg, run, H100_TE, world=8)
    check_pretrain(cfg, run, B200_TE, 8)


def test_fp8_needs_ada_or_hopper():
    assert "compute capability 8.0" in refused(get_preset("mllm-1.3b"), RunConfig(fp8="hybrid"), A100_TE, world=8)


def test_fp8_token_count_per_rank_must_divide_by_16():
    """ImageNet presets: 260 tokens per sequence; micro-batch 1 gives 260 rows, not a multiple of 16."""
    cfg = apply_overrides(get_preset("imagenet-m"), {"train.micro_batch_size": "1", "train.global_batch_size": "8"})
    message = refused(cfg, RunConfig(fp8="hybrid"), H100_TE, world=8)
    assert "divisible by 16" in message and "260" in message and "multiple of 4" in message
    check_pretrain(apply_overrides(cfg, {"train.micro_batch_size": "4", "train.global_batch_size": "32"}),
                   RunConfig(fp8="hybrid"), H100_TE, 8)


def test_fp8_hidden_size_must_divide_by_16():
    cfg = apply_overrides(get_preset("tiny"), {"model.hidden_size": "72", "model.num_attention_heads": "4"})
    assert "model.hidden_size = 72" in refused(cfg, RunConfig(fp8="hybrid"), H100_TE)


def test_bf16_on_a_gpu_without_bf16_is_refused():
    assert "no BF16" in refused(get_preset("tiny"), RunConfig(precision="bf16"), V100)


def test_layouts_megatron_would_reject_deep_inside_are_refused_by_name():
    tiny = get_preset("tiny")
    assert "tensor-parallel 3 must divide the attention heads" in refused(
        apply_overrides(tiny, {"parallel.tensor_parallel": "3"}), RunConfig(), CPU, world=3)
    assert "sequence-parallel needs" in refused(apply_overrides(tiny, {"parallel.sequence_parallel": "true"}),
                                                RunConfig(), CPU)
    assert "3 processes do not divide" in refused(apply_overrides(tiny, {"parallel.tensor_parallel": "2"}),
                                                  RunConfig(), CPU, world=3)
    assert "not a multiple of micro_batch_size" in refused(tiny, RunConfig(), CPU, world=3)


def test_every_problem_is_listed_at_once():
    cfg = apply_overrides(get_preset("imagenet-m"), {"train.micro_batch_size": "1", "train.global_batch_size": "8",
                                                     "parallel.sequence_parallel": "true"})
    message = refused(cfg, RunConfig(fp8="hybrid", fp8_recipe="mxfp8"), H100_TE, world=8)
    assert "Blackwell" in message and "divisible by 32" in message and "sequence-parallel" in message


def test_a_runnable_run_passes_and_its_line_names_spec_precision_layout_and_data():
    cfg = get_preset("quickstart")
    check_pretrain(cfg, RunConfig(), CPU, 2)
    line = describe_pretrain(cfg, RunConfig(data="/data/shards"), CPU, 2, "no GPU: no MFU")
    for part in ("layer spec local", "precision fp32", "TP=2 PP=1 DP=1 SP=off", "data /data/shards"):
        assert part in line, part
    line = describe_pretrain(get_preset("mllm-1.3b"), RunConfig(fp8="hybrid"), H100_TE, 8, "H100 dense FP8 peak")
    assert "layer spec transformer_engine 2.8.0" in line and "bf16 + FP8 hybrid (delayed recipe)" in line
    line = describe_pretrain(get_preset("mllm-1.3b"), RunConfig(), H100_NO_TE, 8, "")
    assert "layer spec local (Transformer Engine: ImportError: libcudnn.so.9)" in line
    assert layer_spec(probe_machine()) == "local"  # this CPU machine


def test_selective_recompute_recomputes_the_mlp():
    te = numerics_overrides(RunConfig(recompute="selective"), transformer_engine=True)
    local = numerics_overrides(RunConfig(recompute="selective"), transformer_engine=False)
    assert te["recompute_modules"] == ["mlp"] and local["recompute_modules"] == ["core_attn", "mlp"]


def test_sigma_vae_options_are_checked_against_machine_and_files(tmp_path):
    from latentlm_mcore.vae import SIGMA_VAE_PRESETS
    from latentlm_mcore.vae.trainer import TrainConfig

    model = SIGMA_VAE_PRESETS["tiny"]
    (tmp_path / "images").mkdir()
    ok = TrainConfig(train_data=str(tmp_path / "images"), out_dir=str(tmp_path / "out"))
    check_sigma_vae(model, ok, CPU)
    assert "σ-VAE run: 1 process on CPU | precision fp32" in describe_sigma_vae(model, ok, CPU, 1)
    for bad, expected in [
        (replace(ok, init_encoder=str(tmp_path / "vit.pth")), "--init-encoder"),
        (replace(ok, perceptual_weight=1.0), "needs --vgg16-weights"),
        (replace(ok, vgg16_weights=str(tmp_path / "vgg.pth"), perceptual_weight=1.0), "no such file"),
        (replace(ok, batch_size=0), "--batch-size 0"),
        (replace(ok, train_data=""), "--train-data is required"),
    ]:
        with pytest.raises(PreflightError, match=expected):
            check_sigma_vae(model, bad, CPU)
    with pytest.raises(PreflightError, match="BF16"):
        check_sigma_vae(model, ok, V100)


@pytest.mark.slow  # launches the pretraining entry point in a fresh interpreter
def test_pretrain_cli_refuses_fp8_on_this_cpu_before_step_one(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "pretrain" / "pretrain_latentlm.py"), "--preset", "tiny",
                           "--fp8", "hybrid", "--save", str(tmp_path / "run"), "--train.train-steps", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--fp8 hybrid needs a GPU" in proc.stderr
    assert "iter 1/" not in proc.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()
