"""This process's rank, world size and local rank under torchrun or srun, without importing megatron
(the σ-VAE trainer uses it too). The one library module that edits `os.environ`: the rank variables under
srun, the default rendezvous address, and forgetting the launcher for a world of one."""
from __future__ import annotations

import os


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


def default_rendezvous() -> None:
    """MASTER_ADDR/MASTER_PORT for torch's env:// rendezvous where the launcher set none (a one-node run
    started without torchrun); the sbatch scripts export them from the job's node list."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def become_world_of_one() -> None:
    """Forget the launcher's rank variables, so this process starts a world of one (inference inside a
    torchrun/srun job step, before any process group exists)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        os.environ.pop(key, None)
