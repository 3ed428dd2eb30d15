"""Training metrics: a console progress line, metrics.jsonl, TensorBoard, wandb, a loss-curve PNG.

Only the logging rank (global rank 0) creates an instance. metrics.jsonl lives next to the
checkpoints and is appended to across resumes; the PNG is redrawn from it, so a resumed run's curve
continues the old one (entries past the resumed iteration, from a run that died, are dropped).
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

# Dense (no sparsity) tensor-core peaks per device, TFLOP/s, from the vendor datasheets: (part, the
# substrings of torch.cuda.get_device_name() that identify it, BF16, FP8). Most specific part first: "H100"
# alone is the SXM part ("NVIDIA H100 80GB HBM3"); the PCIe and NVL parts have lower clocks and peaks.
# FP8 None: the part has no FP8 tensor cores. MXFP8 runs at the FP8 rate on Blackwell.
PEAKS = (
    ("GH200", ("GH200",), 989.0, 1979.0),
    ("H200 NVL", ("H200 NVL",), 835.0, 1671.0),
    ("H200", ("H200",), 989.0, 1979.0),
    ("H100 NVL", ("H100 NVL",), 835.0, 1671.0),
    ("H100 PCIe", ("H100 PCIe",), 756.0, 1513.0),
    ("H100", ("H100",), 989.0, 1979.0),
    ("GB200", ("GB200",), 2500.0, 5000.0),
    ("B200", ("B200",), 2250.0, 4500.0),
    ("A100", ("A100",), 312.0, None),
    ("L40S", ("L40S",), 362.0, 733.0),
)
PEAK_BF16_TFLOPS = {part: bf16 for part, _, bf16, _ in PEAKS}  # by part name (tools/plan_run.py)


def peak_for(device_name: str, precision: str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s, which peak it is) for a device name and "bf16" / "fp8" (fp32 runs are
    measured against the BF16 peak, and say so). None when the part or its FP8 rate is unknown."""
    kind = "fp8" if precision == "fp8" else "bf16"
    for part, needles, bf16, fp8 in PEAKS:
        if any(n.lower() in device_name.lower() for n in needles):
            value = fp8 if kind == "fp8" else bf16
            if value is None:
                return None, f"{part} has no {kind.upper()} peak"
            return value, f"{part} dense {kind.upper()} peak {value:g} TFLOP/s"
    return None, f"no peak known for {device_name!r} (pass --peak-tflops)"


def device_peak_tflops(override: float | None = None, precision: str = "bf16") -> tuple[float | None, str]:
    """(peak TFLOP/s per device for MFU, a description naming which peak): `override` if given, else looked
    up from this GPU's name and the run's precision ("bf16" / "fp8"); (None, why) on a CPU."""
    if override:
        return override, f"given peak {override:g} TFLOP/s"
    if not torch.cuda.is_available():
        return None, "no GPU: no MFU"
    return peak_for(torch.cuda.get_device_name(), precision)


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d{h:02d}h" if d else (f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s")


class MetricsLogger:
    def __init__(self, save_dir: str, run, run_name: str, config: dict, start_iteration: int, total_steps: int):
        os.makedirs(save_dir, exist_ok=True)
        self.save_dir, self.total_steps = save_dir, total_steps
        self.jsonl = os.path.join(save_dir, "metrics.jsonl")
        self._truncate_after(start_iteration)
        self.tb = None
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(save_dir, "tensorboard"))
        self.wandb = None
        if run.wandb_project:
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=run.wandb_project, name=run_name, config=config, mode=mode,
                                    dir=save_dir, resume="allow", id=os.environ.get("WANDB_RUN_ID"))
        self._t_start, self._it_start = time.time(), start_iteration

    def _truncate_after(self, iteration: int) -> None:
        if not os.path.exists(self.jsonl):
            return
        with open(self.jsonl) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        tmp = self.jsonl + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.jsonl)

    def log(self, iteration: int, metrics: dict, prefix: str = "train") -> None:
        record = {"iteration": iteration, "split": prefix, **metrics}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k.replace(' ', '_')}", v, iteration)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=iteration)
        print(self._line(iteration, metrics, prefix), flush=True)

    def _line(self, iteration: int, m: dict, prefix: str) -> str:
        if prefix != "train":
            return (f"[{prefix}] iter {iteration} | lm loss {m['lm loss']:.4f} (ppl {m['lm ppl']:.2f}) | "
                    f"diffusion loss {m['diffusion loss']:.4f}")
        done = iteration - self._it_start
        rate = done / max(time.time() - self._t_start, 1e-9)
        eta = (self.total_steps - iteration) / rate if rate > 0 else float("inf")
        mfu = f" | MFU {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
        return (f"iter {iteration}/{self.total_steps} ({100 * iteration / self.total_steps:.1f}%) | "
                f"lm {m['lm loss']:.4f} | diff {m['diffusion loss']:.4f} | gnorm {m['grad_norm']:.3f} | "
                f"lr {m['lr']:.2e} | {m['tokens_per_s']:,.0f} tok/s | {m['tflops_per_device']:.2f} TFLOP/s{mfu} | "
                f"ETA {_fmt_duration(eta)}")

    def plot(self) -> str:
        """Redraw loss_curve.png (LM and diffusion loss, train and eval) from metrics.jsonl."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.jsonl) as f:
            records = [json.loads(line) for line in f if line.strip()]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ("lm loss", "diffusion loss")):
            for split, style in (("train", "-"), ("eval", "o--")):
                pts = [(r["iteration"], r[key]) for r in records if r["split"] == split and key in r]
                if pts:
                    ax.plot(*zip(*pts), style, label=split, markersize=4)
            ax.set_title(key)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(self.save_dir, "loss_curve.png")
        fig.savefig(path + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
