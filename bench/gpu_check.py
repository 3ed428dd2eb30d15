"""The GPU check: what the CPU tests cannot prove, in one run of a few minutes on one GPU (issue 19).

    bash scripts/gpu_check.sh --collect                 # here: wheels for Python 3.12 into .whl/
    bash scripts/gpu_check.sh "$OUT"                    # there: install them beside the machine's torch, run this
    python bench/gpu_check.py --out DIR [--parts a,b,c,d,e,f]    # directly, where the dependencies import

Parts, each recorded in DIR/gpu_check.json with its figures and a verdict (ok / failed / skipped and why):
  a  build at TP=1 on NCCL (gloo on a CPU), the replicated parameters' broadcast over the TP group run on
     their device, and 2 training steps with finite losses. One GPU cannot host a TP=2 NCCL group, so the
     TP=2 broadcast itself stays unproven there.
  b  bench/gpu_step.py at --preset tiny and at the 1.3B shape with micro-batch 1 (BF16, this machine's layer
     spec; with no Transformer Engine that is the local spec): step time, peak memory, MFU against the BF16 peak.
  c  generation (megatron KV cache and prefix recompute) from a checkpoint saved on this device: same tokens.
  d  a run saved at step 2 and resumed equals an uninterrupted 4-step run (losses step by step).
  e  host-device synchronisations in one training step (torch.cuda.set_sync_debug_mode), with where they happen.
  f  recompute none / selective / full: equal losses over 2 steps.
On a CPU every part but (e) runs (b at --preset tiny only): `--cpu` is what CI runs (tests/bench/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = "abcdef"


def tolerance() -> float:
    """Relative difference counted as equal: fp32 on a CPU is deterministic; BF16 on a GPU is not quite
    (atomic adds in the embedding's backward reorder sums), so the figure is reported beside the verdict."""
    import torch

    return 1e-3 if torch.cuda.is_available() else 1e-6


def small_preset():
    """The quickstart model at TP=1: small enough for seconds per part on a CPU, the real architecture."""
    from latentlm_mcore.config import ParallelConfig, apply_overrides, get_preset

    cfg = apply_overrides(get_preset("quickstart"), {"train.global_batch_size": "4", "train.micro_batch_size": "2",
                                                     "train.warmup_steps": "1", "train.train_steps": "4"})
    cfg.parallel = ParallelConfig()
    return cfg


def batches(cfg, seed: int):
    from latentlm_mcore.data.loader.synthetic import random_packed_batch

    m, i = cfg.model, 0
    while True:
        yield random_packed_batch(cfg.train.micro_batch_size, m.seq_length, m.vocab_size, m.latent_dim,
                                  num_latents=4, images_per_sequence=2, seed=seed * 1000 + i)
        i += 1


def build(cfg, run):
    from latentlm_mcore.training.trainer import Trainer

    return Trainer(cfg, run)


def train_steps(trainer, data, steps: int) -> list[float]:
    return [trainer.step(data)["loss"] for _ in range(steps)]


def run_config(**kw):
    from latentlm_mcore.config import RunConfig

    return RunConfig(tensorboard=False, log_interval=1, **kw)


# ---------------------------------------------------------------- parts
def part_a(cfg, tmp: Path) -> dict:
    import torch
    from megatron.core import parallel_state

    from megatron.core.utils import unwrap_model

    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = build(cfg, run_config())
        model = unwrap_model(trainer.chunks)[0]
        group = parallel_state.get_tensor_model_parallel_group()
        backend = torch.distributed.get_backend(group)
        devices = sorted({str(p.device) for p in model.parameters()})
        src = torch.distributed.get_global_rank(group, 0)
        for p in model.replicated_params():  # what __init__ does at TP > 1, here over the one-rank group
            torch.distributed.broadcast(p.data, src=src, group=group)
        losses = train_steps(trainer, batches(cfg, 0), 2)
    finally:
        shutdown_distributed()
    ok = len(devices) == 1 and all(map(_finite, losses))
    return {"ok": ok, "tp_backend": backend, "param_devices": devices, "losses": losses,
            "unproven": "a TP=2 NCCL group (one GPU): the broadcast ran over a one-rank group"}


def part_b(cfg, tmp: Path, on_gpu: bool) -> dict:
    runs = [("tiny", ["--preset", "tiny", "--micro-batch-size", "2", "--steps", "3", "--warmup", "1"])]
    if on_gpu:
        runs.append(("mllm-1.3b", ["--preset", "mllm-1.3b", "--micro-batch-size", "1", "--microbatches", "2",
                                   "--steps", "5", "--warmup", "2"]))
    out, ok = {}, True
    for name, args in runs:
        target = tmp / f"gpu_step_{name}.json"
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_step.py"), *args, "--out", str(target)],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0 or not target.exists():
            out[name] = {"ok": False, "exit": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:]}
            ok = False
            continue
        out[name] = json.loads(target.read_text())
    out["ok"] = ok
    return out


def part_c(cfg, tmp: Path) -> dict:
    import torch

    from latentlm_mcore.inference.generation import SamplingConfig, SpecialTokens, generate
    from latentlm_mcore.inference.megatron import load_megatron_model, megatron_decoder
    from latentlm_mcore.training.checkpoint import save_model, save_run_config
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    directory = tmp / "generation_ckpt" / "iter_0000002"
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = build(cfg, run_config())
        train_steps(trainer, batches(cfg, 1), 2)
        save_model(trainer.chunks, str(directory))
        save_run_config(str(directory), cfg)
    finally:
        shutdown_distributed()
    model, *_ = load_megatron_model(str(directory))
    v = cfg.model.vocab_size
    special = SpecialTokens(bod=v - 4, eod=v - 3, latent=v - 2, end_of_document=v - 1, latents_per_image=4)
    prompts = [[v - 1, 11, 12, 13, v - 4], [v - 1, 21, 22]]  # one prompt opens an image, one continues text
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, diffusion_steps=4, seed=0)
    cached = generate(megatron_decoder(model, use_cache=True), prompts, special, sampling, progress=False)
    recomputed = generate(megatron_decoder(model, use_cache=False), prompts, special, sampling, progress=False)
    shutdown_distributed()
    same_tokens = [a.tokens == b.tokens for a, b in zip(cached, recomputed)]
    images = [img for s in cached for img in s.images]
    return {"ok": all(same_tokens) and bool(images) and all(bool(torch.isfinite(i).all()) for i in images),
            "device": str(next(model.parameters()).device), "tokens": [s.tokens for s in cached],
            "images": len(images), "kv_cache_equals_recompute": same_tokens}


def part_d(cfg, tmp: Path) -> dict:
    from latentlm_mcore.runtime import metrics
    from latentlm_mcore.training.trainer import pretrain

    metrics.MetricsLogger.plot = lambda self, keys, name="loss_curve.png": None  # the loss-curve PNG (matplotlib) is not under test here

    def losses(save: Path) -> list[float]:
        records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [r["loss"] for r in records if r["split"] == "train"]

    whole, split = tmp / "whole", tmp / "split"
    pretrain(cfg, run_config(save=str(whole)))
    pretrain(cfg, run_config(save=str(split), exit_after=2))
    summary = pretrain(cfg, run_config(save=str(split)))  # resumes from its own iter_0000002
    a, b = losses(whole), losses(split)
    worst = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=float("nan"))
    return {"ok": len(a) == len(b) == 4 and worst <= tolerance() and summary["iteration"] == 4,
            "uninterrupted": a, "resumed": b, "max_relative_difference": worst, "tolerance": tolerance()}


def part_e(cfg, tmp: Path, on_gpu: bool) -> dict:
    if not on_gpu:
        return {"ok": None, "skipped": "no GPU: torch.cuda.set_sync_debug_mode needs CUDA"}
    import torch

    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = build(cfg, run_config())
        data = batches(cfg, 2)
        train_steps(trainer, data, 2)  # warm up: allocator, first-call setup
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_steps(trainer, data, 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        shutdown_distributed()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{os.path.relpath(w.filename, REPO) if w.filename.startswith(str(REPO)) else w.filename}:{w.lineno}"
                    for w in syncs)
    micro_batches = cfg.train.global_batch_size // cfg.train.micro_batch_size
    return {"ok": True, "syncs_per_step": len(syncs), "micro_batches_per_step": micro_batches,
            "where": dict(where.most_common(20))}


def part_f(cfg, tmp: Path) -> dict:
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    out = {}
    for recompute in (None, "selective", "full"):
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        try:
            trainer = build(cfg, run_config(recompute=recompute))
            out[recompute or "none"] = train_steps(trainer, batches(cfg, 3), 2)
        finally:
            shutdown_distributed()
    ref = out["none"]
    worst = max(abs(x - y) / max(abs(y), 1e-12) for k in ("selective", "full") for x, y in zip(out[k], ref))
    return {"ok": worst <= tolerance(), "losses": out, "max_relative_difference": worst, "tolerance": tolerance()}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--parts", default=PARTS, help="which parts to run, e.g. acd")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible (CI)")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        os.environ.pop(key, None)  # a world of one
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    import torch

    from latentlm_mcore.training.preflight import probe_machine

    on_gpu = torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = probe_machine()
    report = {"machine": machine.__dict__, "torch": torch.__version__, "python": sys.version.split()[0],
              "megatron_core": _version("megatron-core"), "parts": {}}
    cfg = small_preset()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for part in args.parts:
            fn = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f}[part]
            t0 = time.time()
            work = Path(tmp) / part
            work.mkdir()
            try:
                result = fn(cfg, work, on_gpu) if part in "be" else fn(cfg, work)
            except BaseException as e:  # noqa: BLE001 — a part's crash is its result; the others still run
                result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = round(time.time() - t0, 1)
            report["parts"][part] = result
            verdict = {True: "ok", False: "FAILED", None: "skipped"}[result.get("ok")]
            print(f"gpu_check part {part}: {verdict} ({result['seconds']} s)", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [k for k, v in report["parts"].items() if v.get("ok") is False]
    print(f"wrote {out / 'gpu_check.json'}; failed parts: {failed or 'none'}")
    return 1 if failed else 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
