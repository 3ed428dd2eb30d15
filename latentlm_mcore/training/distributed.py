"""Process group and megatron parallel-state setup, on GPU (NCCL) or CPU (gloo)."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from latentlm_mcore.compat import enable_cpu_fallbacks, mend_distributed_optimizer_torch_adam
from latentlm_mcore.config import ParallelConfig
from latentlm_mcore.runtime.ranks import default_rendezvous, rank_and_world_from_env


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Start the process group (if needed) and megatron's TP/PP/DP groups; seed every RNG.

    Without CUDA this also switches on the CPU fallbacks of `latentlm_mcore.compat`.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_fallbacks()
    mend_distributed_optimizer_torch_adam()
    if not dist.is_initialized():
        rank, world, local_rank = rank_and_world_from_env()
        default_rendezvous()
        if on_gpu:  # a site that binds one GPU per task shows each task one device, whatever its local rank
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # a world of one needs no rendezvous: an in-memory store avoids racing for a TCP port
        store = dist.HashStore() if world == 1 else None
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world, store=store,
                                timeout=timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # the CPU fallback tracks the default generator: restart it cleanly


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
