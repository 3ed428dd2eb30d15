"""The one switch that lets megatron-core run without CUDA, plus one megatron bug mend.

`enable_cpu_fallbacks()` is a no-op when CUDA is available. Without CUDA it redirects every place
where megatron-core (0.16.x) hard-codes a CUDA device to the CPU, so the *real* megatron code paths
(tensor/sequence/pipeline parallelism, DDP, the distributed optimizer, dist checkpointing) run on
CPU with the gloo backend. Each patch below names what it patches and why.

`mend_distributed_optimizer_torch_adam()` fixes resume of the distributed optimizer over the
torch-AdamW fallback (used whenever neither Transformer Engine nor apex is installed, CPU or GPU).

`SPRMSNorm` is the norm our local layer spec uses: megatron's local `WrappedTorchNorm` refuses
sequence parallelism.
"""
from __future__ import annotations

import logging

import torch

_enabled = False
_cuda_to_cpu_mode = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


# megatron checks `tensor.type()` against CUDA type names in two places:
#   optimizer/clip_grads.py asserts grad.type() == 'torch.cuda.FloatTensor';
#   optimizer/distrib_optimizer.py raises TypeError unless param.type() is a torch.cuda.* type.
_CPU_TYPES_SHOWN_AS_CUDA = ("torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor")


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU for every torch call made while active.

    megatron creates tensors with `device="cuda"` literals (pipeline_parallel/schedules.py
    total_num_tokens, optimizer/clip_grads.py norm buffers, distributed/param_and_grad_buffer.py,
    dist_checkpointing exchange utils), calls `.cuda()` (tensor_parallel/data.py,
    language_module.py embedding sync) and `.to("cuda")`; `pin_memory=True` needs CUDA as well.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name in _CPU_TYPES_SHOWN_AS_CUDA else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for a CUDA stream: DDP and p2p wait on streams and events that do not exist."""

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


def _patch_cuda_device_queries():
    # `torch.cuda.current_device()` is used as a device argument all over megatron (RoPE inv_freq,
    # SP all-gather / reduce-scatter buffers, vocab-parallel cross-entropy, p2p receive buffers);
    # answering "cpu" makes those tensors land on the CPU.
    torch.cuda.current_device = lambda: "cpu"
    # p2p communication, DDP and checkpointing synchronize the device; nothing to wait for on CPU.
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NoStream()


def _patch_rng_tracker():
    """megatron's CudaRNGStatesTracker (model_parallel_cuda_manual_seed, tracker.fork() around
    dropout in tensor-parallel regions) saves and restores the CUDA generator; track the CPU one."""
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # fork() warns whenever the CPU generator moved inside the fork, which is expected here.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


def enable_cpu_fallbacks() -> bool:
    """Activate all CPU redirections when CUDA is absent. Idempotent. Returns True if active."""
    global _enabled, _cuda_to_cpu_mode
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    _patch_cuda_device_queries()
    _patch_rng_tracker()
    _cuda_to_cpu_mode = CudaToCpuMode()
    _cuda_to_cpu_mode.__enter__()
    _enabled = True
    return True


def cpu_fallbacks_active() -> bool:
    return _enabled


class SPRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm that megatron accepts under sequence parallelism.

    megatron's `WrappedTorchNorm` (the local spec's norm without apex/TE) asserts
    `not config.sequence_parallel`. Under SP each rank normalizes its own sequence shard, so the
    weight's gradient is partial per rank: tagging it `sequence_parallel` makes
    `finalize_model_grads` all-reduce it over the TP group, as TE/apex norms are tagged.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def mend_distributed_optimizer_torch_adam() -> None:
    """Fix resuming megatron's DistributedOptimizer over torch AdamW (no apex / TE). Idempotent.

    megatron-core 0.16 has three defects on that path (measured):
    1. `sharded_state_dict(is_loading=True)` on a fresh optimizer asserts `len(steps) == 1`
       because no state exists yet: callers materialise it first with
       `materialize_optimizer_state(optimizer)` (below).
    2. the fully_reshardable load copies every state key into the optimizer but 'step' is not among
       the loaded tensors -> `KeyError: 'step'`: keep the current step tensor for that key.
    3. `load_state_dict` assigns ONE shared 'step' tensor to all params; torch AdamW increments it
       in place once per param, so bias correction is wrong after resume: un-share it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_latentlm_mended", False):
        return
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])
        return set_states(self, model_param, tensors)

    load_state_dict = DistributedOptimizer.load_state_dict

    def _load_state_dict(self, state_dict):
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = _load_state_dict
    DistributedOptimizer._latentlm_mended = True


def materialize_optimizer_state(optimizer) -> None:
    """Create optimizer state (dummy values) so a sharded_state_dict for loading can be built
    (defect 1 above). The loaded checkpoint overwrites both the state and the parameters."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
