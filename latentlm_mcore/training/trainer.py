"""The pretraining loop on Megatron-Core: the `Trainer` (model chunks -> DDP -> optimizer -> scheduler, one
step, evaluation, checkpoints, the loop) that pretraining, the benches and the parity tests share.

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
import time

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from latentlm_mcore.config import LatentLMConfig, RunConfig
from latentlm_mcore.data.loader.stream import CountingIterator, DataStream
from latentlm_mcore.training.sample_ids import SampleIdLog
from latentlm_mcore.model import build_model, transformer_config, transformer_engine_available
from latentlm_mcore.runtime.lease import LeaseHeld, check_may_publish, lease_on_rank0
from latentlm_mcore.runtime.metrics import MetricsLogger, plain_summary
from latentlm_mcore.runtime.preemption import PreemptionFlag
from latentlm_mcore.runtime.ranks import rank_and_world_from_env
from latentlm_mcore.training.checkpoint import (latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint,
                                                shield_checkpoint_writer_from_signals)
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.training.flops import training_flops
from latentlm_mcore.training.metrics import device_peak_tflops
from latentlm_mcore.training.preflight import check_pretrain, describe_pretrain, probe_machine
from latentlm_mcore.training.provenance import Provenance
from latentlm_mcore.training.step import build_optimizer, evaluate, params_synced, train_step, wrap_with_ddp


def console_summary(split: str, m: dict) -> str:
    """Pretraining's part of the console line (runtime/metrics.py adds iteration, progress and ETA)."""
    if split != "train" and "lm_loss" not in m:  # a callback's own metrics (the FID hook's)
        return plain_summary(split, m)
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
        trainer = Trainer(cfg, run)
        summary = trainer.fit(trainer.data_stream(run.data, cfg.train.seed),
                              may_publish, peak)
        shutdown_distributed()
        return summary
    finally:
        if lease is not None:
            lease.release()


class TrainerCallback:
    """An extension of the loop (an EMA of the weights, a periodic sample or FID evaluation, ...): override
    what you need. `state_dict` goes into every checkpoint's common state under `callbacks.<name>` (it must
    be the same on every rank and picklable) and comes back through `load_state_dict` on resume; tensors
    sharded like the model (`sharded_state_dict`) go into the distributed checkpoint beside it, resharded
    at load like the model, and come back through `load_sharded_state_dict`."""

    name = "callback"

    def attach(self, trainer: "Trainer") -> None:
        """When the trainer is built, and after it resumed from a checkpoint without this callback's state."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """When `fit` starts, before the first step: `trainer.data` (its manifest) and `trainer.logger` (rank 0;
        None elsewhere) are set."""

    def on_step_end(self, trainer: "Trainer", result: dict) -> None:
        """After every optimizer step (trainer.iteration already counts it); `result` as `train_step` returns."""

    def on_evaluate(self, trainer: "Trainer") -> dict:
        """At every evaluation (eval_interval): metrics to log under `eval`."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sharded_state_dict(self, trainer: "Trainer", is_loading: bool = False) -> dict:
        """megatron ShardedTensors (keys of their own, e.g. `callbacks.<name>.` + the model's); when loading,
        the targets to load into."""
        return {}

    def load_sharded_state_dict(self, trainer: "Trainer", loaded: dict) -> None:
        """What `dist_checkpointing.load` returned for `sharded_state_dict(trainer, is_loading=True)`."""


def callbacks_from_config(cfg: LatentLMConfig, run: RunConfig | None = None) -> list[TrainerCallback]:
    """The callbacks the configs turn on: the EMA of the weights (train.ema_decay > 0), the periodic FID of
    class-to-image samples (run.eval_fid_every > 0; after the EMA, whose weights it may sample from)."""
    callbacks = []
    if cfg.train.ema_decay:
        from latentlm_mcore.training.ema import ExponentialMovingAverage
        callbacks.append(ExponentialMovingAverage(cfg.train.ema_decay))
    if run is not None and run.eval_fid_every:
        from latentlm_mcore.training.fid_hook import FIDEvaluation
        callbacks.append(FIDEvaluation(run, cfg))
    return callbacks


class Trainer:
    """LatentLM on Megatron-Core: model chunks (built from `cfg` / `run`, or given, e.g. with the local layer
    spec), megatron DDP around them, the (distributed) optimizer and the warmup + cosine schedule.
    Process groups must exist (`init_distributed`).

    `step(batches)` is one optimizer step, `evaluate(batches, n)` a forward-only pass, `save_checkpoint` /
    `resume` the full training state, `fit(data)` the pretraining loop (logging, evaluation, checkpoints,
    preemption). `callbacks` (`TrainerCallback`) extend the loop without copying it; those the configs turn
    on (`callbacks_from_config`: the EMA) come first."""

    def __init__(self, cfg: LatentLMConfig, run: RunConfig | None = None, chunks=None,
                 params_dtype: torch.dtype = torch.float32, overlap: bool | None = None, callbacks=()):
        self.cfg, self.run = cfg, run or RunConfig()
        if chunks is None:
            _, chunks, params_dtype = build_model_chunks(cfg, self.run)
        self.params_dtype = params_dtype
        self.chunks = wrap_with_ddp(chunks, cfg.parallel, overlap=overlap)
        for chunk in self.chunks:
            chunk.broadcast_params()  # identical replicas across DP from the start
        self.optimizer = build_optimizer(self.chunks, cfg.train, cfg.parallel, params_dtype=params_dtype)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.callbacks = callbacks_from_config(cfg, self.run) + list(callbacks)
        for callback in self.callbacks:
            callback.attach(self)
        self.iteration, self.consumed_tokens = 0, 0
        self.data: DataStream | None = None  # the training stream `fit` reads (its position is checkpointed)
        self.logger: MetricsLogger | None = None  # `fit`'s, on rank 0: where callbacks log metrics of their own

    def data_stream(self, root: str | None, seed: int) -> DataStream:
        """This rank's micro-batches of the dataset at `root` (None: random batches)."""
        return DataStream(self.cfg, self.run, root, self.cfg.train.micro_batch_size, seed,
                          parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())

    def data_positions(self) -> list:
        """The training stream's position on every DP rank (the same list on all ranks), for the checkpoint."""
        states = [None] * parallel_state.get_data_parallel_world_size()
        torch.distributed.all_gather_object(states, self.data.state_dict(), group=parallel_state.get_data_parallel_group())
        return states

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())

    def per_chunk(self, batches):
        """Every model chunk (virtual pipeline stage) reads the whole micro-batch stream."""
        return list(itertools.tee(batches, len(self.chunks))) if len(self.chunks) > 1 else batches

    def step(self, batches) -> dict:
        """One optimizer step on the next global batch of `batches` (this rank's micro-batches; one iterator,
        or one per model chunk), then the schedule. Returns `train_step`'s losses and grad norm."""
        t, seq = self.cfg.train, self.cfg.model.seq_length
        result = train_step(self.chunks, self.optimizer, batches, self.num_microbatches, seq, t.micro_batch_size)
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_tokens += t.global_batch_size * seq
        for callback in self.callbacks:
            callback.on_step_end(self, result)
        return result

    def evaluate(self, batches, num_microbatches: int) -> dict:
        """Forward-only losses over `num_microbatches` of `batches` on every DP rank together."""
        return evaluate(self.chunks, batches, num_microbatches, self.cfg.model.seq_length,
                        self.cfg.train.micro_batch_size)

    def evaluate_held_out(self) -> dict:
        """LM loss / perplexity and diffusion loss on the first `eval_iters` micro-batches of the held-out
        data (the same batches every time, so evaluations are comparable), plus the callbacks' metrics."""
        cfg, run = self.cfg, self.run
        result = {}
        if run.eval_data:
            data = self.data_stream(run.eval_data, seed=cfg.train.seed + 1)
            result = self.evaluate(self.per_chunk(iter(data)), run.eval_iters)
            result["lm_ppl"] = math.exp(min(result["lm_loss"], 50.0))
        for callback in self.callbacks:
            result.update(callback.on_evaluate(self))
        return result

    def save_checkpoint(self, provenance: Provenance | None = None, may_publish=None) -> str:
        """The full training state as checkpoint `iteration` in `run.save`, published atomically."""
        common = {"consumed_tokens": self.consumed_tokens,
                  "data": self.data_positions() if self.data is not None else None,
                  "callbacks": {c.name: c.state_dict() for c in self.callbacks}}
        with params_synced(self.chunks):
            sharded = {c.name: c.sharded_state_dict(self) for c in self.callbacks}
            return save_checkpoint(self.run.save, self.iteration, self.chunks, self.optimizer, self.scheduler,
                                   common, self.cfg, provenance, self.run.keep_last, may_publish,
                                   callbacks={name: sd for name, sd in sharded.items() if sd})

    def resume(self, path: str) -> None:
        """Model, optimizer, schedule, RNG, data position and callback states from checkpoint `path`."""
        sharded = {c.name: c.sharded_state_dict(self, is_loading=True) for c in self.callbacks}
        common = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler,
                                 callbacks={name: sd for name, sd in sharded.items() if sd})
        self.iteration, self.consumed_tokens = common["iteration"], common["consumed_tokens"]
        if self.data is not None and common.get("data") is not None:
            self.data.load_state_dicts(common["data"])
        for callback in self.callbacks:
            if callback.name in common.get("callbacks", {}):
                callback.load_state_dict(common["callbacks"][callback.name])
                if callback.name in common["loaded_callbacks"]:
                    callback.load_sharded_state_dict(self, common["loaded_callbacks"][callback.name])
            else:  # e.g. --load of a run trained without it: start from the loaded weights
                callback.attach(self)

    def fit(self, data: DataStream, may_publish=None, peak: float | None = None) -> dict:
        """Train on `data` until cfg.train.train_steps (or run.exit_after steps, or a preemption signal),
        resuming this run's latest checkpoint (else --load). Returns the final iteration, why it stopped and
        the last logged metrics."""
        cfg, run, t = self.cfg, self.run, self.cfg.train
        shield_checkpoint_writer_from_signals()  # before the handlers: the writer's processes must not inherit them
        preempt = PreemptionFlag()
        rank0 = torch.distributed.get_rank() == 0
        self.data = data

        # this run's own latest checkpoint wins (a restarted job resumes itself); else --load starts it
        resume_from = latest_checkpoint(run.save) or (resolve_checkpoint(run.load) if run.load else None)
        if resume_from is not None:
            self.resume(resume_from)
            if rank0:
                print(f"resumed from {resume_from} at iteration {self.iteration} ({self.consumed_tokens:,} tokens)",
                      flush=True)

        stream = CountingIterator(iter(data))
        batches = self.per_chunk(stream)
        logger = MetricsLogger(run.save, total_iterations=t.train_steps, start_iteration=self.iteration,
                               tensorboard=run.tensorboard, wandb_project=run.wandb_project, run_name=cfg.name,
                               config=dataclasses.asdict(cfg), summary=console_summary) if rank0 else None
        self.logger = logger
        for callback in self.callbacks:
            callback.on_fit_start(self)
        world = torch.distributed.get_world_size()
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        # what generation and export need to read and write this model's data (None: random batches)
        provenance = Provenance.from_manifest(data.manifest, run.data) if data.manifest is not None else None

        sample_ids = None
        if run.log_sample_ids and data.loader is not None:
            data.loader.take_consumed()  # from here on the loader keeps the layouts it yields
            if rank0:
                sample_ids = SampleIdLog(run.save, self.iteration, parallel_state.get_data_parallel_world_size())

        def checkpoint():
            self.save_checkpoint(provenance, may_publish)
            if logger is not None:
                logger.plot(("lm_loss", "diffusion_loss"))

        stop_reason, last = "finished", {}
        start_iteration = self.iteration
        window_t, window_steps, window_latents = time.time(), 0, 0
        while self.iteration < t.train_steps:
            before = stream.latent_targets
            result = self.step(batches)
            iteration = self.iteration
            window_steps += 1
            window_latents += stream.latent_targets - before

            if iteration % run.log_interval == 0 or iteration == t.train_steps:
                latents = torch.tensor([float(window_latents)], device="cuda" if torch.cuda.is_available() else "cpu")
                torch.distributed.all_reduce(latents, group=parallel_state.get_data_parallel_group())  # over DP
                elapsed = time.time() - window_t
                flops = training_flops(cfg.model, cfg.model.seq_length, num_latent_targets=latents.item(),
                                       num_sequences=t.global_batch_size * window_steps)
                tflops_per_device = flops / elapsed / world / 1e12
                last = {"loss": result["loss"], "lm_loss": result["lm_loss"], "diffusion_loss": result["diffusion_loss"],
                        "grad_norm": result["grad_norm"], "lr": self.optimizer.param_groups[0]["lr"],
                        "tokens_per_s": tokens_per_step * window_steps / elapsed, "tflops_per_device": tflops_per_device,
                        "mfu": tflops_per_device / peak if peak else None, "consumed_tokens": self.consumed_tokens}
                if data.loader is not None:  # the global stream's, so the same on every rank
                    last.update({f"token_share_{s}": v for s, v in data.loader.token_share().items()})
                if logger is not None:
                    logger.log(iteration, last)
                window_t, window_steps, window_latents = time.time(), 0, 0

            if (run.eval_data or self.callbacks) and run.eval_interval and iteration % run.eval_interval == 0:
                evaluation = self.evaluate_held_out()
                if logger is not None and evaluation:
                    logger.log(iteration, evaluation, split="eval")
            preempted = preempt.any_rank()
            done_here = run.exit_after is not None and iteration - start_iteration >= run.exit_after
            saving = preempted or done_here or iteration % run.save_interval == 0 or iteration == t.train_steps
            if saving:
                checkpoint()
            if run.log_sample_ids and data.loader is not None:
                consumed = data.loader.take_consumed()
                if sample_ids is not None:  # after the checkpoint: a step logged as saved is in `latest`
                    sample_ids.write(iteration, consumed, {k: result[k] for k in ("lm_loss", "diffusion_loss")}, saving)
            if preempted:
                stop_reason = f"signal {preempt.received or 'on another rank'}"
                break
            if done_here:
                stop_reason = "exit_after"
                break
        if logger is not None:
            print(f"stopped at iteration {self.iteration}: {stop_reason}", flush=True)
            logger.close()
        return {"iteration": self.iteration, "stop_reason": stop_reason, "last": last}
