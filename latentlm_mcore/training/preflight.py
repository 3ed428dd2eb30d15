"""Before a run trains: what it will run, said in one line, and what it cannot run, refused.

A pretraining run asked for FP8 on a machine whose Transformer Engine failed to import would otherwise
train to the end in BF16 or FP32 with no word about it; a shape TE's FP8 GEMMs cannot take fails deep
inside TE at the first step. `check_pretrain` raises `PreflightError` naming every missing piece before
any process group or model exists; `describe_pretrain` is the start-up line (layer spec, precision,
parallel layout, data, MFU peak). `check_sigma_vae` does the same for the σ-VAE trainer's options.

The machine is described by a `Machine` (probed once by `probe_machine`), so every rule is a pure
function that tests can run against any machine on a CPU. No megatron import here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

# FP8 recipes: the compute capability TE needs for each (TE's own checks, transformer_engine/pytorch/fp8.py)
# and the multiple that the GEMM dimensions must have (16 for per-tensor FP8, 32 for MXFP8's 1x32 blocks).
FP8_RECIPES = {
    "delayed": ((8, 9), 16, "Ada or Hopper (compute capability 8.9+)"),
    "tensorwise": ((8, 9), 16, "Ada or Hopper (compute capability 8.9+)"),
    "blockwise": ((9, 0), 16, "Hopper (compute capability 9.0+)"),
    "mxfp8": ((10, 0), 32, "Blackwell (compute capability 10.0+)"),
}


class PreflightError(ValueError):
    """A run asked for something this machine or configuration cannot do; the message says what."""


@dataclass(frozen=True)
class Machine:
    gpu: str | None = None  # torch.cuda.get_device_name(), None without CUDA
    capability: tuple[int, int] | None = None  # torch.cuda.get_device_capability()
    gpus: int = 0  # devices visible to this process
    bf16: bool = False  # BF16 tensor cores (compute capability 8.0+)
    transformer_engine: str | None = None  # TE's version when transformer_engine.pytorch imports
    transformer_engine_error: str | None = None  # why it does not, when it does not


def probe_machine() -> Machine:
    """This process's machine: its GPU and whether Transformer Engine imports (and why not)."""
    import torch

    if not torch.cuda.is_available():
        return Machine(transformer_engine_error="no GPU (Transformer Engine layers are only built on CUDA)")
    te, error = None, None
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401

        te = getattr(transformer_engine, "__version__", "unknown version")
    except Exception as e:  # ImportError, or a TE build that does not match the driver / torch
        error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    capability = tuple(torch.cuda.get_device_capability())
    # BF16 tensor cores from Ampere (8.0) on; read off the capability, which allocates nothing on the device
    return Machine(gpu=torch.cuda.get_device_name(), capability=capability,
                   gpus=torch.cuda.device_count(), bf16=capability >= (8, 0),
                   transformer_engine=te, transformer_engine_error=error)


def layer_spec(machine: Machine) -> str:
    """The layer spec `model.specs.default_block_spec` picks on this machine."""
    return "transformer_engine" if machine.gpu and machine.transformer_engine else "local"


def effective_precision(run, machine: Machine) -> str:
    """fp32 / bf16 (the parameters' dtype, `trainer.params_dtype`), with the FP8 recipe when asked for."""
    dtype = run.precision if run.precision != "auto" else ("bf16" if machine.gpu else "fp32")
    return f"{dtype} + FP8 {run.fp8} ({run.fp8_recipe} recipe)" if run.fp8 else dtype


def tokens_per_rank(cfg) -> int:
    """Rows of the backbone's GEMMs per micro-batch on one rank: the sequence (1/TP of it with sequence
    parallelism) times the micro-batch."""
    p = cfg.parallel
    seq = cfg.model.seq_length // (p.tensor_parallel if p.sequence_parallel else 1)
    return seq * cfg.train.micro_batch_size


def check_pretrain(cfg, run, machine: Machine, world_size: int) -> None:
    """Raise PreflightError listing everything the run asks for that this machine or layout cannot do."""
    problems = []
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if run.precision == "bf16" and machine.gpu and not machine.bf16:
        problems.append(f"--precision bf16: {machine.gpu} has no BF16 support; use --precision fp32")
    if run.fp8:
        problems += _fp8_problems(cfg, run, machine)
    # layout: megatron asserts these deep in its setup, without naming the option
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if world_size % (tp * pp):
        problems.append(f"{world_size} processes do not divide into tensor-parallel {tp} x pipeline-parallel {pp}")
    if m.num_attention_heads % tp or (m.num_query_groups or m.num_attention_heads) % tp:
        problems.append(f"--parallel.tensor-parallel {tp} must divide the attention heads ({m.num_attention_heads}) "
                        f"and query groups ({m.num_query_groups or m.num_attention_heads})")
    if m.ffn_hidden_size % tp:
        problems.append(f"--parallel.tensor-parallel {tp} must divide model.ffn_hidden_size {m.ffn_hidden_size}")
    if p.sequence_parallel and tp == 1:
        problems.append("--parallel.sequence-parallel needs --parallel.tensor-parallel > 1")
    if p.sequence_parallel and m.seq_length % tp:
        problems.append(f"--parallel.sequence-parallel: model.seq_length {m.seq_length} is not divisible by "
                        f"tensor-parallel {tp}")
    vpp = p.virtual_pipeline_parallel
    if vpp and pp == 1:
        problems.append("--parallel.virtual-pipeline-parallel needs --parallel.pipeline-parallel > 1")
    if m.num_layers % (pp * (vpp or 1)):
        problems.append(f"model.num_layers {m.num_layers} is not divisible by pipeline-parallel {pp} x "
                        f"virtual stages {vpp or 1}")
    dp = max(world_size // (tp * pp), 1)
    if t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(f"train.global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size "
                        f"{t.micro_batch_size} x data-parallel size {dp}")
    if problems:
        raise PreflightError("refusing to start:\n  - " + "\n  - ".join(problems))


def _fp8_problems(cfg, run, machine: Machine) -> list[str]:
    flag = f"--fp8 {run.fp8}"
    if not machine.gpu:
        return [f"{flag} needs a GPU: none is visible to this process (torch.cuda.is_available() is False)"]
    if not machine.transformer_engine:
        return [f"{flag} needs Transformer Engine, which does not import here ({machine.transformer_engine_error}); "
                "without it the run would use megatron's local layer spec, which has no FP8. Install "
                "transformer-engine[pytorch] matching this torch and CUDA, or drop --fp8"]
    problems = []
    capability, multiple, needs = FP8_RECIPES[run.fp8_recipe]
    if machine.capability is not None and tuple(machine.capability) < capability:
        sm = "%d.%d" % tuple(machine.capability)
        problems.append(f"{flag} with --fp8-recipe {run.fp8_recipe} needs {needs}; {machine.gpu} is compute "
                        f"capability {sm}")
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    rows = tokens_per_rank(cfg)
    if rows % multiple:
        seq = rows // cfg.train.micro_batch_size
        step = multiple // math.gcd(seq, multiple)
        problems.append(f"{flag}: TE's FP8 GEMMs need the tokens per rank of a micro-batch divisible by {multiple}: "
                        f"{seq} per sequence x micro-batch {cfg.train.micro_batch_size} = {rows}; use a "
                        f"--train.micro-batch-size that is a multiple of {step}")
    for name, size in (("model.hidden_size", m.hidden_size), ("model.ffn_hidden_size / tensor-parallel", m.ffn_hidden_size // tp)):
        if size % multiple:
            problems.append(f"{flag}: {name} = {size} is not divisible by {multiple}, as TE's FP8 GEMMs need")
    return problems


def describe_pretrain(cfg, run, machine: Machine, world_size: int, peak: str) -> str:
    """The start-up line: what this run runs."""
    p = cfg.parallel
    dp = max(world_size // (p.tensor_parallel * p.pipeline_parallel), 1)
    spec = layer_spec(machine)
    if spec == "local":
        spec += f" (Transformer Engine: {machine.transformer_engine_error})" if machine.gpu else " (CPU)"
    else:
        spec += f" {machine.transformer_engine}"
    device = f"{machine.gpus} x {machine.gpu} per node" if machine.gpu else "CPU"
    layout = (f"TP={p.tensor_parallel} PP={p.pipeline_parallel} DP={dp} SP={'on' if p.sequence_parallel else 'off'} "
              f"VPP={p.virtual_pipeline_parallel or 1} distributed optimizer {'on' if p.distributed_optimizer else 'off'}")
    data = run.data or "random packed batches (no --data)"
    recompute = run.recompute or "none"
    return (f"run {cfg.name}: {_processes(world_size)} on {device} | layer spec {spec} | precision "
            f"{effective_precision(run, machine)} | recompute {recompute} | {layout} | data {data} | MFU: {peak}")


def check_sigma_vae(model_cfg, cfg, machine: Machine) -> None:
    """The σ-VAE trainer's options against this machine and their files (raises PreflightError)."""
    problems = []
    if machine.gpu and not machine.bf16:
        problems.append(f"the σ-VAE trains under BF16 autocast on a GPU; {machine.gpu} has no BF16 support")
    if not cfg.train_data:
        problems.append("--train-data is required (an image folder or a .jsonl of paths)")
    # files only where they are read: a resumed run has its initial encoder in its checkpoint (the file may be
    # gone by then), and the VGG16 weights serve the perceptual loss alone
    resuming = os.path.exists(os.path.join(cfg.out_dir, "checkpoint.pt"))
    for flag, path in (("--train-data", cfg.train_data), ("--eval-data", cfg.eval_data),
                       ("--init-encoder", "" if resuming else cfg.init_encoder),
                       ("--vgg16-weights", cfg.vgg16_weights if cfg.perceptual_weight > 0 else "")):
        if path and not os.path.exists(path):
            problems.append(f"{flag} {path}: no such file or folder")
    if cfg.perceptual_weight > 0 and not cfg.vgg16_weights:
        problems.append(f"--perceptual-weight {cfg.perceptual_weight} needs --vgg16-weights PATH (a torchvision "
                        "VGG16 state_dict, e.g. vgg16-397923af.pth), or pass --perceptual-weight 0")
    if cfg.batch_size < 1:
        problems.append(f"--batch-size {cfg.batch_size} must be at least 1")
    if cfg.epochs <= 0 and cfg.train_steps < 1:
        problems.append(f"--train-steps {cfg.train_steps} must be at least 1 (or give --epochs)")
    if not 0 <= cfg.warmup_steps:
        problems.append(f"--warmup-steps {cfg.warmup_steps} must not be negative")
    if problems:
        raise PreflightError("refusing to start the σ-VAE run:\n  - " + "\n  - ".join(problems))


def describe_sigma_vae(model_cfg, cfg, machine: Machine, world_size: int) -> str:
    device = f"{machine.gpu}" if machine.gpu else "CPU"
    precision = "bf16 autocast" if machine.gpu else "fp32"
    losses = ["MSE", "σ-VAE prior"] + (["perceptual"] if cfg.perceptual_weight > 0 else []) + \
        ([f"GAN from step {cfg.gan_start_step}"] if cfg.gan_start_step >= 0 else [])
    encoder = f"encoder from {cfg.init_encoder}" if cfg.init_encoder else "random encoder"
    return (f"σ-VAE run: {_processes(world_size)} on {device} | precision {precision} | losses {', '.join(losses)} | "
            f"{encoder} | data {cfg.train_data}")


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"
