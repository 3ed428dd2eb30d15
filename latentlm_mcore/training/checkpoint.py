"""Distributed checkpoints of the model with megatron.core.dist_checkpointing.

A checkpoint saved at one TP/PP layout loads at any other: every tensor is stored by its global
(unsharded) name and offsets.
"""
from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing
from megatron.core.utils import unwrap_model


def model_sharded_state_dict(chunks) -> dict:
    chunks = unwrap_model(chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks, directory: str) -> None:
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks, directory: str) -> None:
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint")
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), directory)
    chunks = unwrap_model(chunks)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)


# ---------------------------------------------------------------- layout of a save directory
#   <save>/latest                    "iter_0000100": the newest complete checkpoint
#   <save>/iter_0000100/             megatron dist checkpoint ("model", "optimizer", ... keys)
#   <save>/iter_0000100/run_config.json   the LatentLMConfig of the run (+ data/tokenizer/VAE info)

RUN_CONFIG = "run_config.json"
LATEST = "latest"


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save_run_config(directory: str, cfg, extra: dict | None = None) -> None:
    """Write the run's LatentLMConfig (and `extra`, e.g. tokenizer / sigma-VAE info) as JSON."""
    import dataclasses
    import json

    payload = {"config": dataclasses.asdict(cfg), "extra": extra or {}}
    tmp = os.path.join(directory, RUN_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, os.path.join(directory, RUN_CONFIG))


def load_run_config(directory: str):
    """(LatentLMConfig, extra dict) from a checkpoint directory's run_config.json."""
    import json

    from latentlm_mcore.config import LatentLMConfig, ModelConfig, ParallelConfig, TrainConfig

    path = os.path.join(directory, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {RUN_CONFIG}; not a checkpoint written by latentlm_mcore")
    with open(path) as f:
        payload = json.load(f)
    c = payload["config"]
    cfg = LatentLMConfig(name=c["name"], model=ModelConfig(**c["model"]), train=TrainConfig(**c["train"]),
                         parallel=ParallelConfig(**c["parallel"]))
    return cfg, payload.get("extra", {})


def resolve_checkpoint(save_dir: str, iteration: int | None = None) -> str:
    """Directory of checkpoint `iteration` in `save_dir`, or of the latest one; a directory that
    is itself a checkpoint is returned as is. Raises naming the path when nothing complete is there."""
    if os.path.isfile(os.path.join(save_dir, RUN_CONFIG)) and iteration is None:
        return save_dir
    if iteration is None:
        latest = os.path.join(save_dir, LATEST)
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"{save_dir}: no '{LATEST}' file, so no complete checkpoint to load")
        with open(latest) as f:
            name = f.read().strip()
    else:
        name = iteration_dirname(iteration)
    path = os.path.join(save_dir, name)
    if not dist_checkpointing.check_is_distributed_checkpoint(path) or not os.path.isfile(os.path.join(path, RUN_CONFIG)):
        raise FileNotFoundError(f"{path}: missing or incomplete checkpoint")
    return path
