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
