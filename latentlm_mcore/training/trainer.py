"""The pretraining loop on Megatron-Core.

`pretrain(cfg, run)`: process groups -> model chunks (pipeline stages, virtual stages) -> optional
Float16Module (BF16) -> megatron DDP -> distributed optimizer -> warmup + cosine scheduler -> data
(one packed loader per data-parallel rank; TP/PP peers read the same documents) -> resume from the
latest checkpoint -> steps with logging, evaluation, checkpoints, and a clean save-and-exit on
SIGTERM / SIGUSR1 (Slurm preemption). One writer per run: rank 0 holds the lease on `--save`
(runtime/lease.py) for the whole run, and no checkpoint is published by a rank whose launcher has died
(runtime/watchdog.py, armed by the entry point) or whose lease was taken over.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from latentlm_mcore.config import LatentLMConfig, RunConfig
from latentlm_mcore.model import build_model, transformer_config, transformer_engine_available
from latentlm_mcore.runtime.lease import LeaseHeld, check_may_publish, lease_on_rank0
from latentlm_mcore.runtime.metrics import MetricsLogger
from latentlm_mcore.runtime.preemption import PreemptionFlag
from latentlm_mcore.training.checkpoint import (latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint,
                                                shield_checkpoint_writer_from_signals)
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.training.flops import head_forward_flops, training_flops
from latentlm_mcore.training.metrics import device_peak_tflops
from latentlm_mcore.training.preflight import check_pretrain, describe_pretrain, probe_machine
from latentlm_mcore.runtime.ranks import rank_and_world_from_env
from latentlm_mcore.training.step import build_optimizer, evaluate, params_synced, train_step, wrap_with_ddp
from latentlm_mcore.training.synthetic import random_packed_batch


def console_summary(split: str, m: dict) -> str:
    """Pretraining's part of the console line (runtime/metrics.py adds iteration, progress and ETA)."""
    if split != "train":
        return f"lm_loss {m['lm_loss']:.4f} (ppl {m['lm_ppl']:.2f}) | diffusion_loss {m['diffusion_loss']:.4f}"
    mfu = f" | MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
    return (f"lm {m['lm_loss']:.4f} | diff {m['diffusion_loss']:.4f} | gnorm {m['grad_norm']:.3f} | "
            f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {m['tflops_per_device']:.2f} TFLOP/s{mfu}")


def params_dtype(run: RunConfig) -> torch.dtype:
    if run.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[run.precision]


def numerics_overrides(run: RunConfig, transformer_engine: bool | None = None) -> dict:
    """TransformerConfig fields for FP8 (Transformer Engine, backbone linears only: the diffusion head
    and latent projection are plain torch modules) and activation recomputation.

    Selective recomputation recomputes the MLP (its SwiGLU activations are the largest saved tensors
    of a layer) and, with the local spec, the attention core (its [s, s] scores); TE's fused attention
    keeps no scores, so recomputing it would only cost time."""
    if transformer_engine is None:
        transformer_engine = transformer_engine_available()
    out = {}
    if run.fp8:
        out.update(fp8=run.fp8, fp8_recipe=run.fp8_recipe, fp8_margin=0, fp8_amax_history_len=1024,
                   fp8_amax_compute_algo="max")
    if run.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif run.recompute == "selective":
        out.update(recompute_granularity="selective",
                   recompute_modules=["mlp"] if transformer_engine else ["core_attn", "mlp"])
    return out


def build_model_chunks(cfg: LatentLMConfig, run: RunConfig):
    dtype = params_dtype(run)
    config = transformer_config(cfg.model, cfg.parallel, params_dtype=dtype, **numerics_overrides(run))
    vpp = cfg.parallel.virtual_pipeline_parallel
    chunks = [build_model(cfg.model, config, vp_stage=i if vpp else None) for i in range(vpp or 1)]
    if torch.cuda.is_available():
        chunks = [c.cuda() for c in chunks]
    if dtype != torch.float32:
        chunks = [Float16Module(config, c) for c in chunks]
    return config, chunks, dtype


def build_scheduler(optimizer, cfg: LatentLMConfig) -> OptimizerParamScheduler:
    t = cfg.train
    if not 0 <= t.warmup_steps < t.train_steps:
        raise ValueError(f"train.warmup_steps ({t.warmup_steps}) must be below train.train_steps ({t.train_steps})")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.train_steps, lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=t.train_steps, wd_incr_style="constant")


class DataStream:
    """Micro-batches for this rank: the packed loader of its DP rank, or seeded random batches."""

    def __init__(self, cfg: LatentLMConfig, run: RunConfig, root: str | None, micro_batch_size: int, seed: int):
        self.cfg = cfg
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.dp_rank, self.dp_size, self.mbs, self.seed = dp_rank, dp_size, micro_batch_size, seed
        self.loader = None
        self.random_batches_served = 0
        if root is not None:
            from latentlm_mcore.data.loader.packed import LoaderConfig, PackedLoader
            from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture, parse_proportions

            cache = run.data_cache and os.path.join(run.data_cache, f"{os.path.basename(os.path.normpath(root))}-{seed}")
            mixture = StreamMixture(MixtureConfig(dataset_root=root, cache_dir=cache, unit=run.mixture_unit,
                                                  proportions=parse_proportions(run.proportions), seed=seed))
            if mixture.latent_dim != cfg.model.latent_dim:
                raise ValueError(f"{root}: latents have dim {mixture.latent_dim}, the model expects "
                                 f"{cfg.model.latent_dim} (model.latent_dim)")
            tokenizer = mixture.manifest["tokenizer"]
            if tokenizer["vocab_size"] > cfg.model.vocab_size:
                raise ValueError(f"{root}: tokenizer {tokenizer['spec']} needs a vocabulary of {tokenizer['vocab_size']}, "
                                 f"the model has {cfg.model.vocab_size} (model.vocab_size)")
            self.loader = PackedLoader(mixture, LoaderConfig(
                seq_length=cfg.model.seq_length, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                dp_world_size=dp_size, condition_dropout=run.condition_dropout, num_workers=run.num_workers,
                image_first_share=run.image_first_share, sample_latents=run.sample_latents))

    def __iter__(self):
        if self.loader is not None:
            yield from self.loader
            return
        m = self.cfg.model
        while True:  # random batches, distinct per DP rank and step: throughput measurements only
            index = self.random_batches_served * self.dp_size + self.dp_rank
            self.random_batches_served += 1
            yield random_packed_batch(self.mbs, m.seq_length, m.vocab_size, m.latent_dim,
                                      num_latents=min(256, m.seq_length // 4), images_per_sequence=1,
                                      seed=self.seed * 1_000_003 + index)

    def state_dicts(self) -> list:
        """This position for every DP rank (same list on all ranks), for the checkpoint."""
        mine = self.loader.state_dict() if self.loader is not None else {"random_batches_served": self.random_batches_served}
        states = [None] * self.dp_size
        torch.distributed.all_gather_object(states, mine, group=parallel_state.get_data_parallel_group())
        return states

    def load_state_dicts(self, states: list) -> None:
        if self.loader is not None:
            self.loader.load_state_dict(states)
        else:
            self.random_batches_served = states[0]["random_batches_served"] * len(states) // self.dp_size


class CountingIterator:
    """Passes micro-batches through and counts their diffusion targets (for model FLOPs)."""

    def __init__(self, it):
        self.it, self.latent_targets = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.latent_targets += int(batch["diffusion_mask"].sum())
        return batch


def pretrain(cfg: LatentLMConfig, run: RunConfig) -> dict:
    """Train until cfg.train.train_steps (or run.exit_after steps, or a preemption signal). Returns a
    summary: final iteration, why it stopped, the last logged metrics."""
    # refuse before any process group or model exists what this machine or layout cannot run; the probe
    # (which imports TE) runs on this rank's own GPU, not on GPU 0 of every rank
    _, world_size, local_rank = rank_and_world_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    machine = probe_machine()
    check_pretrain(cfg, run, machine, world_size)
    peak, peak_description = device_peak_tflops(run.peak_tflops, "fp8" if run.fp8 else "bf16")
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        lease = lease_on_rank0(run.save, wait=run.lease_wait)
    except LeaseHeld:
        shutdown_distributed()
        raise

    if torch.distributed.get_rank() == 0:
        print(describe_pretrain(cfg, run, machine, world_size, peak_description), flush=True)

    def may_publish():
        check_may_publish(lease)

    try:
        return _train(cfg, run, may_publish, peak)
    finally:
        if lease is not None:
            lease.release()


def _train(cfg: LatentLMConfig, run: RunConfig, may_publish, peak) -> dict:
    t, p = cfg.train, cfg.parallel
    shield_checkpoint_writer_from_signals()  # before the handlers: the writer's processes must not inherit them
    preempt = PreemptionFlag()
    rank0 = torch.distributed.get_rank() == 0
    dp = parallel_state.get_data_parallel_world_size()
    num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)

    config, chunks, dtype = build_model_chunks(cfg, run)
    chunks = wrap_with_ddp(chunks, p)
    for chunk in chunks:
        chunk.broadcast_params()  # identical replicas across DP from the start
    optimizer = build_optimizer(chunks, t, p, params_dtype=dtype)
    scheduler = build_scheduler(optimizer, cfg)
    data = DataStream(cfg, run, run.data, t.micro_batch_size, t.seed)

    # this run's own latest checkpoint wins (a restarted job resumes itself); else --load starts it
    iteration, consumed_tokens = 0, 0
    resume_from = latest_checkpoint(run.save) or (resolve_checkpoint(run.load) if run.load else None)
    if resume_from is not None:
        common = load_checkpoint(resume_from, chunks, optimizer, scheduler)
        iteration, consumed_tokens = common["iteration"], common["consumed_tokens"]
        data.load_state_dicts(common["data"])
        if rank0:
            print(f"resumed from {resume_from} at iteration {iteration} ({consumed_tokens:,} tokens)", flush=True)

    # every model chunk (virtual pipeline stage) reads the whole micro-batch stream
    stream = CountingIterator(iter(data))
    per_chunk = list(itertools.tee(stream, len(chunks))) if len(chunks) > 1 else [stream]
    logger = MetricsLogger(run.save, total_iterations=t.train_steps, start_iteration=iteration,
                           tensorboard=run.tensorboard, wandb_project=run.wandb_project, run_name=cfg.name,
                           config=dataclasses.asdict(cfg), summary=console_summary) if rank0 else None
    world = torch.distributed.get_world_size()
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    run_extra = {"data": run.data}
    if data.loader is not None:  # what generation and export need to read and write this model's data
        manifest = data.loader.mixture.manifest
        run_extra.update(tokenizer=manifest["tokenizer"]["spec"], sigma_vae=(manifest.get("vae") or {}).get("path"))

    def checkpoint():
        common = {"consumed_tokens": consumed_tokens, "data": data.state_dicts()}
        with params_synced(chunks):
            save_checkpoint(run.save, iteration, chunks, optimizer, scheduler, common, cfg, run_extra, run.keep_last,
                            may_publish)
        if logger is not None:
            logger.plot(("lm_loss", "diffusion_loss"))

    stop_reason, last = "finished", {}
    start_iteration = iteration
    window_t, window_steps, window_latents = time.time(), 0, 0
    while iteration < t.train_steps:
        before = stream.latent_targets
        result = train_step(chunks, optimizer, per_chunk if len(per_chunk) > 1 else per_chunk[0],
                            num_microbatches, cfg.model.seq_length, t.micro_batch_size)
        scheduler.step(increment=1)
        iteration += 1
        consumed_tokens += tokens_per_step
        window_steps += 1
        window_latents += stream.latent_targets - before

        if iteration % run.log_interval == 0 or iteration == t.train_steps:
            latents = torch.tensor([float(window_latents)], device="cuda" if torch.cuda.is_available() else "cpu")
            torch.distributed.all_reduce(latents, group=parallel_state.get_data_parallel_group())  # over DP
            elapsed = time.time() - window_t
            flops = (training_flops(cfg.model, cfg.model.seq_length) * t.global_batch_size * window_steps
                     + 3 * head_forward_flops(cfg.model, latents.item()))
            tflops_per_device = flops / elapsed / world / 1e12
            last = {"loss": result["loss"], "lm_loss": result["lm loss"], "diffusion_loss": result["diffusion loss"],
                    "grad_norm": result["grad_norm"], "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_s": tokens_per_step * window_steps / elapsed, "tflops_per_device": tflops_per_device,
                    "mfu": tflops_per_device / peak if peak else None, "consumed_tokens": consumed_tokens}
            if data.loader is not None:  # the global stream's, so the same on every rank
                last.update({f"token_share_{s}": v for s, v in data.loader.token_share().items()})
            if logger is not None:
                logger.log(iteration, last)
            window_t, window_steps, window_latents = time.time(), 0, 0

        if run.eval_data and run.eval_interval and iteration % run.eval_interval == 0:
            evaluate_held_out(cfg, run, chunks, iteration, logger)
        preempted = preempt.any_rank()
        done_here = run.exit_after is not None and iteration - start_iteration >= run.exit_after
        if preempted or done_here or iteration % run.save_interval == 0 or iteration == t.train_steps:
            checkpoint()
        if preempted:
            stop_reason = f"signal {preempt.received or 'on another rank'}"
            break
        if done_here:
            stop_reason = "exit_after"
            break
    if logger is not None:
        print(f"stopped at iteration {iteration}: {stop_reason}", flush=True)
        logger.close()
    shutdown_distributed()
    return {"iteration": iteration, "stop_reason": stop_reason, "last": last}


def evaluate_held_out(cfg: LatentLMConfig, run: RunConfig, chunks, iteration: int, logger) -> dict:
    """LM loss / perplexity and diffusion loss on the first `eval_iters` micro-batches of the held-out
    data (the same batches every time, so evaluations are comparable)."""
    data = DataStream(cfg, run, run.eval_data, cfg.train.micro_batch_size, seed=cfg.train.seed + 1)
    it = iter(data)
    result = evaluate(chunks, it if len(chunks) == 1 else list(itertools.tee(it, len(chunks))),
                      run.eval_iters, cfg.model.seq_length, cfg.train.micro_batch_size)
    result = {key.replace(" ", "_"): value for key, value in result.items()}  # metric keys are single words
    result["lm_ppl"] = math.exp(min(result["lm_loss"], 50.0))
    if logger is not None:
        logger.log(iteration, result, split="eval")
    return result
