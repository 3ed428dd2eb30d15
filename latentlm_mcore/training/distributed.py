"""Process group and megatron parallel-state setup, on GPU (NCCL) or CPU (gloo)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from latentlm_mcore.compat import enable_cpu_fallbacks, mend_distributed_optimizer_torch_adam
from latentlm_mcore.config import ParallelConfig


def tasks_on_this_node(tasks_per_node: str, node_id: int) -> int:
    """Entry `node_id` of Slurm's SLURM_TASKS_PER_NODE, e.g. "8(x16)" or "2(x3),1"."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node_id]


def rank_and_world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun or, failing that, Slurm's srun variables.

    Under srun the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) are
    exported too: other libraries read them (mosaicml-streaming elects one leader per node from
    them; without them every task thinks it leads and they race creating shared memory)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        local_world = tasks_on_this_node(os.environ.get("SLURM_TASKS_PER_NODE", str(world)),
                                         int(os.environ.get("SLURM_NODEID", 0)))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_world))
        return rank, world, local_rank
    return 0, 1, 0


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
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if on_gpu:
            torch.cuda.set_device(local_rank)
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
