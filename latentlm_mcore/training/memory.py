"""Per-GPU memory of a parallel layout, from the real model built for one rank of a simulated cluster.

`rank_states(model_cfg, layout)`: megatron's parallel state is initialised over torch's fake process
group (`FakeStore`: every collective returns at once, any world size), the model chunks of one rank are
built exactly as `training/trainer.py` builds them, with parameters on the meta device, and wrapped in the
same megatron DDP and (distributed) optimizer as `training/step.py`. What that rank holds is then read off
the real objects: parameter storage (BF16, DDP's contiguous buffer with its padding when the distributed
optimizer is on), the FP32 gradient buffer, and the optimizer's FP32 main parameters + Adam moments
(sharded over DP by the distributed optimizer). Only the distinct rank kinds are built (first / middle /
last pipeline stage; TP and DP peers hold the same sizes), so a 70B-class layout of 1,024 ranks plans in
seconds.

Activations (`activation_bytes`) are a formula, term by term what the local layer spec and the diffusion
head keep for backward; `bench/memory_activations.py` checks it against measured peaks on CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentlm_mcore.config import ModelConfig, ParallelConfig, TrainConfig

GIB = 1024 ** 3


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int | None = None  # virtual pipeline stages (model chunks) per rank
    sp: bool = False  # sequence parallelism (needs tp > 1)
    distributed_optimizer: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_parallel=self.tp, pipeline_parallel=self.pp, sequence_parallel=self.sp,
                              virtual_pipeline_parallel=self.vpp, distributed_optimizer=self.distributed_optimizer)

    def args(self) -> str:
        """The layout as pretrain/pretrain_latentlm.py (slurm/pretrain_mllm_1.3b.sh) arguments."""
        out = f"--parallel.tensor-parallel {self.tp} --parallel.pipeline-parallel {self.pp}"
        if self.sp:
            out += " --parallel.sequence-parallel true"
        if self.vpp:
            out += f" --parallel.virtual-pipeline-parallel {self.vpp}"
        return out


@dataclass
class RankState:
    """Parameters, gradients and optimizer state one rank holds (bytes; counts in elements)."""
    stage: str  # "only" (PP=1), "first", "middle", "last"
    pipeline_rank: int
    params: int  # parameter elements of this rank (no padding)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # main params + Adam moments

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


class _MetaDevice(torch.overrides.TorchFunctionMode):
    """Sends megatron's hard-coded CUDA allocations (DDP buffers, `.cuda()`) to the meta device and lets the
    distributed optimizer's CUDA-type check pass for meta parameters."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.meta.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            kwargs["device"] = "meta"
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)) \
                and torch.device(args[1]).type == "cuda":
            args = (args[0], "meta") + tuple(args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_rank(layout: Layout, rank: int):
    """megatron's parallel state of global `rank` in a world of `layout.world` fake processes."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("simulated_rank needs a process without a process group (it builds a fake one)")
    new_group = dist.new_group

    def fake_new_group(*args, **kwargs):  # megatron's gloo side groups become fake ones too
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = None
        return new_group(*args, **kwargs)

    def same_object_everywhere(object_list, obj, group=None):  # the ranks a plan stands for are alike
        object_list[:] = [obj] * len(object_list)

    saved = dict(current_device=torch.cuda.current_device, synchronize=torch.cuda.synchronize,
                 all_gather_object=dist.all_gather_object)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
    dist.new_group, dist.all_gather_object = fake_new_group, same_object_everywhere
    torch.cuda.current_device = lambda: "meta"
    torch.cuda.synchronize = lambda device=None: None
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                                 pipeline_model_parallel_size=layout.pp,
                                                 virtual_pipeline_model_parallel_size=layout.vpp)
        with _MetaDevice():
            yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        dist.new_group, dist.all_gather_object = new_group, saved["all_gather_object"]
        torch.cuda.current_device, torch.cuda.synchronize = saved["current_device"], saved["synchronize"]


def state_bytes(chunks, ddp_chunks, optimizer) -> tuple[int, int, int, int]:
    """(parameter elements, parameter bytes, gradient-buffer bytes, optimizer-state bytes) of built objects.

    Parameter bytes are DDP's parameter buffer when it has one (distributed optimizer: padded, contiguous),
    else the parameters themselves; optimizer bytes are the FP32 main parameters plus Adam's two moments
    (torch creates those on the first step, one of each per main parameter)."""
    params = {id(p): p for c in chunks for p in c.parameters()}
    numel = sum(p.numel() for p in params.values())
    buffers = [b for c in ddp_chunks for b in list(c.buffers) + list(c.expert_parallel_buffers)]
    if all(b.param_data is not None for b in buffers) and buffers:
        param_bytes = sum(b.param_data.numel() * b.param_data.element_size() for b in buffers)
    else:
        param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    optimizer_bytes = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = (getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(opt, "fp32_from_float16_groups", None)
                  or [])
        fp32 = getattr(opt, "shard_fp32_groups", None) or getattr(opt, "fp32_from_fp32_groups", None) or []
        main = [p for group in list(groups) + list(fp32) for p in group]
        if not main:  # FP32 training: the optimizer updates the model parameters themselves
            main = [p for group in opt.optimizer.param_groups for p in group["params"]]
            optimizer_bytes += sum(2 * p.numel() * 4 for p in main)
        else:
            optimizer_bytes += sum(3 * p.numel() * 4 for p in main)
    return numel, param_bytes, grad_bytes, optimizer_bytes


def _stage_ranks(layout: Layout) -> dict[str, int]:
    if layout.pp == 1:
        return {"only": 0}
    stages = {"first": 0, "last": layout.pp - 1}
    if layout.pp > 2:
        stages["middle"] = 1
    return stages


def rank_states(model_cfg: ModelConfig, layout: Layout, params_dtype=torch.bfloat16,
                stages: dict[str, int] | None = None) -> list[RankState]:
    """One `RankState` per distinct pipeline-stage kind of `layout` (or per `stages`: name -> pipeline
    rank), from the real model chunks, DDP and optimizer of tensor/data-parallel rank 0 of that stage."""
    from megatron.core.transformer.module import Float16Module

    from latentlm_mcore.compat import mend_distributed_optimizer_torch_adam
    from latentlm_mcore.model import build_model, local_block_spec, transformer_config
    from latentlm_mcore.training.step import build_optimizer, wrap_with_ddp

    mend_distributed_optimizer_torch_adam()
    if layout.sp and layout.tp == 1:
        raise ValueError("sequence parallelism needs tensor_parallel > 1")
    out = []
    for stage, pp_rank in (stages or _stage_ranks(layout)).items():
        rank = pp_rank * layout.tp * layout.dp  # megatron's default order: tp fastest, then dp, then pp
        with simulated_rank(layout, rank):
            parallel = layout.parallel_config()
            # perform_initialization=False: nothing to initialise on meta; the local spec has the parameter
            # shapes of the TE one (TE fuses the norm into the next linear, same weights)
            config = transformer_config(model_cfg, parallel, params_dtype=params_dtype, perform_initialization=False,
                                        use_cpu_initialization=True)
            vp_stages = range(layout.vpp) if layout.vpp else [None]
            with torch.device("meta"):
                chunks = [build_model(model_cfg, config, local_block_spec(config, vp), vp_stage=vp)
                          for vp in vp_stages]
            if params_dtype != torch.float32:
                chunks = [Float16Module(config, c) for c in chunks]
            ddp = wrap_with_ddp(chunks, parallel)
            optimizer = build_optimizer(ddp, TrainConfig(), parallel, params_dtype)
            numel, param_bytes, grad_bytes, optimizer_bytes = state_bytes(chunks, ddp, optimizer)
        out.append(RankState(stage, pp_rank, numel, param_bytes, grad_bytes, optimizer_bytes))
    return out


# ------------------------------------------------------------------ activations
# Bytes kept for backward per element, BF16 activations, megatron's local layer spec: each term measured on CPU by
# varying one dimension at a time with torch's memory tracker (training/memory_measure.py), and read as
#   per layer and token: 34 x h (8 of them the two norms' inputs and outputs, replicated over TP unless SP is on)
#   + 10 x ffn (SwiGLU: fc1 out, silu(gate), their product) + 6 x heads x seq (FP32 softmax + BF16 probs of the
#   unfused attention; absent with fused/flash attention). Selective recompute checkpoints the MLP (and, local spec,
#   the attention core), which then keeps only its input, the pre-MLP norm's output already among the 34 x h: the
#   ffn and score terms go, the 34 x h stay (measured: 34.0 x h per layer and token, whatever the ffn width); full
#   recompute keeps 2 x h (the layer input).
#   outside the layers: 8 x h on the first stage (embedding, latent projection), 17 x h + 4 x vocab/TP on the
#   last (final norm, output layer, the logits of the vocab-parallel cross-entropy).
#   diffusion head, per noised copy (batch_mul per latent target, 1/TP of them per TP rank): 24 x head width +
#   8 x head FFN per head layer, 18 x head width + 60 x latent_dim outside them (condition, timestep MLP, noised
#   input, prediction, loss); plus the noise and timesteps of every position (drawn whole on each TP rank):
#   batch_mul x (4 x latent_dim + 8) per token.
LAYER_HIDDEN, LAYER_HIDDEN_REPLICATED, LAYER_FFN, LAYER_SCORES, FULL_RECOMPUTE_HIDDEN = 34, 8, 10, 6, 2
FIRST_STAGE_HIDDEN, LAST_STAGE_HIDDEN, LOGITS = 8, 17, 4
HEAD_LAYER_WIDTH, HEAD_LAYER_FFN, HEAD_WIDTH, HEAD_LATENT = 24, 8, 18, 60


def layer_activation_bytes(m: ModelConfig, mbs: int, tp: int, sp: bool, recompute: str | None,
                           flash_attention: bool = True) -> float:
    """Bytes one Transformer layer keeps for backward per micro-batch, on one TP rank. `flash_attention`
    (Transformer Engine's fused attention on GPU) keeps no seq x seq scores; megatron's local (unfused)
    attention, the one that runs on CPU, keeps the softmax unless selective recompute drops it. Selective
    recompute (the MLP, and under the local spec the attention core) keeps neither the SwiGLU tensors nor the
    scores."""
    s, h = m.seq_length, m.hidden_size
    replicated = tp if sp else 1
    if recompute == "full":
        return FULL_RECOMPUTE_HIDDEN * s * mbs * h / replicated
    out = s * mbs * h * (LAYER_HIDDEN_REPLICATED / replicated + (LAYER_HIDDEN - LAYER_HIDDEN_REPLICATED) / tp)
    if recompute != "selective":
        out += recomputed_layer_bytes(m, mbs, tp, sp, "selective", flash_attention)
    return out


def recomputed_layer_bytes(m: ModelConfig, mbs: int, tp: int, sp: bool, recompute: str | None,
                           flash_attention: bool = True) -> float:
    """Bytes one layer's recomputation rebuilds during backward (one layer at a time, once per rank on top of
    what the in-flight micro-batches keep): selective, the MLP's SwiGLU tensors (and without flash attention the
    scores); full, everything the layer keeps without recompute beyond its input."""
    s, f, a = m.seq_length, m.ffn_hidden_size, m.num_attention_heads
    if recompute == "selective":
        out = LAYER_FFN * s * mbs * f / tp
        if not flash_attention:
            out += LAYER_SCORES * a * s * s * mbs / tp
        return out
    if recompute == "full":
        return layer_activation_bytes(m, mbs, tp, sp, None, flash_attention)
    return 0.0


def head_activation_bytes(m: ModelConfig, mbs: int, tp: int, latent_fraction: float) -> float:
    """Bytes the diffusion head keeps per micro-batch on one TP rank (it runs on 1/TP of the positions)."""
    copies = m.batch_mul * latent_fraction * m.seq_length * mbs / tp
    per_copy = (m.head_layers * (HEAD_LAYER_WIDTH * m.head_hidden_size + HEAD_LAYER_FFN * m.head_ffn_hidden_size)
                + HEAD_WIDTH * m.head_hidden_size + HEAD_LATENT * m.latent_dim)
    return copies * per_copy + m.seq_length * mbs * m.batch_mul * (4 * m.latent_dim + 8)


def activation_bytes(m: ModelConfig, mbs: int, tp: int = 1, sp: bool = False, recompute: str | None = None,
                     latent_fraction: float = 0.25, layers: int | None = None, first: bool = True,
                     last: bool = True, flash_attention: bool = True) -> float:
    """Activation bytes of one micro-batch on one rank holding `layers` layers (default all) and the first /
    last stage's extra parts, as held when its forward ends. (Recompute adds, during backward, one layer's
    rebuilt tensors at a time: `recomputed_layer_bytes`, once per rank.)"""
    s, h = m.seq_length, m.hidden_size
    replicated = tp if sp else 1
    layers = m.num_layers if layers is None else layers
    out = layers * layer_activation_bytes(m, mbs, tp, sp, recompute, flash_attention)
    if first:
        out += FIRST_STAGE_HIDDEN * s * mbs * h / replicated
    if not flash_attention:  # the explicit boolean causal mask the local attention is given
        out += s * s
    if last:
        out += LAST_STAGE_HIDDEN * s * mbs * h / replicated + LOGITS * s * mbs * m.vocab_size / tp
        out += head_activation_bytes(m, mbs, tp, latent_fraction)
    return out


def in_flight_micro_batches(pp: int, pipeline_rank: int, vpp: int | None, num_micro_batches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once under megatron's 1F1B schedule (stage p
    of P: P - p); interleaved (VPP v): the first stage holds P x (1 + (P-1)/(P v)) micro-batches' worth of
    its chunks, as Megatron-LM's theoretical_memory_usage counts it."""
    if pp == 1:
        return 1.0
    if vpp:
        return min(pp * (1 + (pp - 1) / (pp * vpp)) - pipeline_rank, num_micro_batches)
    return min(pp - pipeline_rank, num_micro_batches)
