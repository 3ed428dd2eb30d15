"""One metrics writer for every trainer: a console progress line, metrics.jsonl, TensorBoard, wandb.

Only the logging rank (global rank 0) creates a `MetricsLogger`. Under `out_dir`:
  metrics.jsonl   one JSON record per `log()`: {"iteration", "split", **metrics}; appended to across resumes,
                  with the records past the resumed iteration (from a run that died) dropped first
  tensorboard/    TensorBoard events, scalars tagged `<split>/<key>` (with `tensorboard=True`)
  wandb/          with a `wandb_project`: online only when WANDB_MODE says so or WANDB_API_KEY is set
Metric keys are single words (`lm_loss`, `psnr`): the same key in every sink, no spaces or slashes.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Callable

from latentlm_mcore.runtime.files import atomic_write

_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d{h:02d}h" if d else (f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s")


def plain_summary(split: str, metrics: dict) -> str:
    """The default console summary: every finite number as `key value`."""
    return " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


class MetricsLogger:
    """`log(iteration, metrics, split)` writes one record to every sink; `summary(split, metrics)` is the
    trainer's text for the console line (`iter i/N (p%) | <summary> | ETA` for train, `[split] iter i |
    <summary>` otherwise)."""

    def __init__(self, out_dir: str, *, total_iterations: int, start_iteration: int = 0, tensorboard: bool = True,
                 wandb_project: str | None = None, run_name: str = "", config: dict | None = None,
                 summary: Callable[[str, dict], str] = plain_summary):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.total_iterations, self.summary = out_dir, total_iterations, summary
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self._truncate_after(start_iteration)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        self.wandb = None
        if wandb_project:
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=wandb_project, name=run_name or None, config=config or {}, mode=mode,
                                    dir=out_dir, resume="allow", id=os.environ.get("WANDB_RUN_ID"))
        self._t_start, self._it_start = time.time(), start_iteration

    def records(self) -> list[dict]:
        if not os.path.exists(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _truncate_after(self, iteration: int) -> None:
        if not os.path.exists(self.jsonl):
            return
        kept = [r for r in self.records() if r.get("iteration", 0) <= iteration]
        with atomic_write(self.jsonl) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, iteration: int, metrics: dict, split: str = "train") -> None:
        bad = [k for k in metrics if not _KEY.match(k)]
        if bad or not _KEY.match(split):
            raise ValueError(f"metric keys must be single words (letters, digits, _ . -): {bad or [split]}")
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"iteration": iteration, "split": split, **metrics}) + "\n")
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}", v, iteration)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=iteration)
        print(self.line(iteration, metrics, split), flush=True)

    def line(self, iteration: int, metrics: dict, split: str = "train") -> str:
        text = self.summary(split, metrics)
        if split != "train":
            return f"[{split}] iter {iteration} | {text}"
        done = iteration - self._it_start
        rate = done / max(time.time() - self._t_start, 1e-9)
        eta = (self.total_iterations - iteration) / rate if rate > 0 else float("inf")
        return (f"iter {iteration}/{self.total_iterations} ({100 * iteration / self.total_iterations:.1f}%) | "
                f"{text} | ETA {format_duration(eta)}")

    def plot(self, keys: tuple[str, ...], name: str = "loss_curve.png") -> str:
        """Redraw `name` from metrics.jsonl: one panel per key, train as a line and eval as points."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for split, style in (("train", "-"), ("eval", "o--")):
                pts = [(r["iteration"], r[key]) for r in records if r["split"] == split and key in r]
                if pts:
                    ax.plot(*zip(*pts), style, label=split, markersize=4)
            ax.set_title(key)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(self.out_dir, name)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
