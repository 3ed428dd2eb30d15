"""Distributed checkpoints with megatron.core.dist_checkpointing.

Layout of a save directory:
  <save>/latest                          "iter_0000100": the newest complete checkpoint
  <save>/iter_0000100/                   the dist checkpoint: "model" (sharded), "optimizer" (sharded,
                                         fully reshardable), "rng_state" (per rank), common state
                                         (iteration, consumed tokens, scheduler, data-loader states)
  <save>/iter_0000100/run_config.json    the LatentLMConfig of the run and its data's Provenance
  <save>/sigma_vae-<sha256[:16]>.pt      the run's σ-VAE, found by hash (training/provenance.py)

Every tensor is stored by its global name and offsets, so a checkpoint loads at any TP/PP/DP.
A checkpoint is written to `iter_N.tmp/` and published by renaming it and then replacing `latest`
(each an atomic rename), so a crash mid-save leaves the previous checkpoint loadable; older
checkpoints beyond `keep_last` are deleted only after that. Before each rename rank 0 asks
`may_publish` (the trainer's: the launcher is alive and the run still holds the directory's lease), so
a rank orphaned by its launcher, or a run whose lease was taken over, never moves `latest`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from latentlm_mcore.compat import materialize_optimizer_state
from latentlm_mcore.runtime.files import write_json_atomic, write_text_atomic
from latentlm_mcore.training.provenance import Provenance, keep_sigma_vae_beside

RUN_CONFIG = "run_config.json"
LATEST = "latest"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def model_sharded_state_dict(chunks) -> dict:
    chunks = unwrap_model(chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(chunks, loaded: dict) -> None:
    chunks = unwrap_model(chunks)
    for i, chunk in enumerate(chunks):
        result = chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)
        # a TE module's `_extra_state` (its FP8 scaling history) may be absent: see drop_absent_extra_state
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing}, "
                               f"unexpected {list(result.unexpected_keys)}")


def drop_absent_extra_state(state: dict, directory: str) -> dict:
    """`state` (a sharded state dict to load) without the `_extra_state` entries the checkpoint lacks.

    Transformer Engine layers describe an `_extra_state` (FP8 scaling factors and amax history) that
    megatron's local layers do not have, so a checkpoint written with the local spec (every CPU run)
    lacks those of TE's attention (`core_attention._extra_state`); a TE model loading it starts that FP8
    state fresh, as a new run does. Weights keep the same names under both specs (the local spec maps
    its norms onto TE's fused names, and its linears write an empty `_extra_state` of their own)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = set(load_sharded_metadata(directory))

    def keep(value) -> bool:  # the checkpoint lists a ShardedObject by its key and offsets (unique_key)
        stored = value.unique_key if isinstance(value, ShardedObject) else value.key
        return not value.key.endswith("_extra_state") or stored in saved

    def prune(d):
        return {k: prune(v) if isinstance(v, dict) else v for k, v in d.items() if not isinstance(v, ShardedBase) or keep(v)}

    return prune(state)


def save_model(chunks, directory: str) -> None:
    """The model alone (no optimizer): for tests and exports."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), directory)


def load_model(chunks, directory: str) -> None:
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint")
    state = drop_absent_extra_state(model_sharded_state_dict(chunks), directory)
    _load_model_state(chunks, dist_checkpointing.load(state, directory))


def shield_checkpoint_writer_from_signals() -> None:
    """Start megatron's checkpoint-writer helper process with SIGTERM / SIGUSR1 ignored.

    dist_checkpointing's torch_dist writer reports through a multiprocessing Manager that it spawns
    on first use. On preemption Slurm signals every process of the job step; a Manager spawned with
    default handlers dies, and the checkpoint that the signal asked for fails with BrokenPipeError.
    An ignored disposition survives the spawn, so the Manager lives until the save is done (and is
    SIGKILLed with the step, or shut down at exit). It is started as megatron would (spawn), with a
    parent-death signal armed, so it never outlives its rank. Call once, before the first save.
    """
    import multiprocessing
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from multiprocessing.managers import SyncManager

    from latentlm_mcore.runtime.watchdog import die_with_parent

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        # megatron's own queue (the global behind `_get_write_results_queue` in 0.16 and
        # `get_write_results_queue` in 0.17+), plus: it dies with this rank
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=die_with_parent)
            filesystem_async._results_queue = manager.Queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- RNG
def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


@contextlib.contextmanager
def rng_preserved():
    """Inside: draw from any generator (python, numpy, torch, CUDA, megatron's TP tracker); after, each is
    back where it was, so what follows (training) draws as if nothing had run (the FID hook)."""
    state = _rng_state()
    try:
        yield
    finally:
        _restore_rng(state)


def _rng_sharded_object() -> ShardedObject:
    state = _rng_state()
    return ShardedObject("rng_state", state, (_layout()["pp"], _layout()["tp"], _layout()["dp"]),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_data_parallel_rank()), replica_id=0)


def _restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ---------------------------------------------------------------- full training state
def save_checkpoint(save_dir: str, iteration: int, chunks, optimizer, scheduler, common: dict, cfg,
                    provenance=None, keep_last: int | None = None, may_publish=None, callbacks: dict | None = None) -> str:
    """Save model, optimizer, scheduler, RNG and `common` (iteration, consumed tokens, data-loader
    states: must be identical on every rank) as checkpoint `iteration`; publish it atomically.
    `callbacks`: {name: sharded state dict} of trainer callbacks (the EMA), saved beside the model.
    `may_publish()`, when given, raises to refuse publishing (the checkpoint stays `iter_N.tmp`)."""
    check = may_publish or (lambda: None)
    final = os.path.join(save_dir, iteration_dirname(iteration))
    tmp = final + ".tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
        os.makedirs(tmp)
    torch.distributed.barrier()
    state = model_sharded_state_dict(chunks)
    model_state = dict(state)
    state["optimizer"] = optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA)
    state["rng_state"] = _rng_sharded_object()
    state["scheduler"] = scheduler.state_dict()
    state["common"] = dict(common, iteration=iteration, layout=_layout())
    if callbacks:
        state["callbacks"] = callbacks
    dist_checkpointing.save(state, tmp)
    torch.distributed.barrier()
    if rank0:
        save_run_config(tmp, cfg, provenance)
        if provenance is not None:
            keep_sigma_vae_beside(save_dir, provenance)
        check()
        if os.path.exists(final):  # the same iteration saved again (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        check()
        _write_latest(save_dir, os.path.basename(final))
        _prune(save_dir, keep_last or len(os.listdir(save_dir)))
    torch.distributed.barrier()
    return final


def _write_latest(save_dir: str, name: str) -> None:
    write_text_atomic(os.path.join(save_dir, LATEST), name + "\n")


def _prune(save_dir: str, keep_last: int) -> None:
    """Delete checkpoints beyond the newest `keep_last`, and debris of saves that crashed."""
    names = os.listdir(save_dir)
    done = sorted(d for d in names if d.startswith("iter_") and not d.endswith(".tmp"))
    debris = [d for d in names if d.startswith("iter_") and d.endswith(".tmp")]
    for old in done[:-keep_last] + debris:
        shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)


def load_checkpoint(path: str, chunks, optimizer=None, scheduler=None, callbacks: dict | None = None) -> dict:
    """Load a checkpoint directory (see `resolve_checkpoint`) into the model chunks and, when given,
    the optimizer and scheduler, at any layout. RNG states are restored when the layout is the
    saving one. Returns the common state (iteration, consumed tokens, data-loader states, ...), with
    `loaded_callbacks`: what was loaded for `callbacks` ({name: sharded state dict to load}; those whose
    callback has no state in the checkpoint are left out)."""
    saved_common = dist_checkpointing.load_common_state_dict(path)
    common = saved_common["common"]
    state = drop_absent_extra_state(model_sharded_state_dict(chunks), path)
    model_state = dict(state)
    if optimizer is not None:
        materialize_optimizer_state(optimizer)  # megatron needs existing state to describe the load
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)
    same_layout = common["layout"] == _layout()
    if same_layout:
        state["rng_state"] = _rng_sharded_object()
    saved_callbacks = common.get("callbacks", {})
    callbacks = {name: sd for name, sd in (callbacks or {}).items() if name in saved_callbacks}
    if callbacks:
        state["callbacks"] = callbacks
    loaded = dist_checkpointing.load(state, path)
    common["loaded_callbacks"] = loaded.get("callbacks", {})
    _load_model_state(chunks, loaded)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved_common["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    return common


# ---------------------------------------------------------------- run config and discovery
def save_run_config(directory: str, cfg, provenance: Provenance | None = None) -> None:
    """Write the run's LatentLMConfig and its data's Provenance (None: random data) as JSON."""
    payload = {"config": dataclasses.asdict(cfg), "provenance": provenance.to_dict() if provenance else None}
    write_json_atomic(os.path.join(directory, RUN_CONFIG), payload, indent=2)


def load_run_config(directory: str):
    """(LatentLMConfig, Provenance) from a checkpoint directory's run_config.json. A checkpoint from before
    the Provenance record (an untyped `extra` dict) loads too: Provenance(legacy=True), without a hash."""
    from latentlm_mcore.config import LatentLMConfig, ModelConfig, ParallelConfig, TrainConfig

    path = os.path.join(directory, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {RUN_CONFIG}; not a checkpoint written by latentlm_mcore")
    with open(path) as f:
        payload = json.load(f)
    c = payload["config"]
    cfg = LatentLMConfig(name=c["name"], model=ModelConfig(**c["model"]), train=TrainConfig(**c["train"]),
                         parallel=ParallelConfig(**c["parallel"]), cfg_scale=c.get("cfg_scale"))
    if "provenance" in payload:
        return cfg, Provenance.from_dict(payload["provenance"]) if payload["provenance"] else Provenance()
    return cfg, Provenance.from_legacy_extra(payload.get("extra") or {})


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


def latest_checkpoint(save_dir: str) -> str | None:
    """The latest complete checkpoint in `save_dir`, or None when there is none yet."""
    try:
        return resolve_checkpoint(save_dir)
    except FileNotFoundError:
        return None
