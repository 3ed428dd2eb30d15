"""Pretrain LatentLM on Megatron-Core.

  torchrun --nproc-per-node 8 pretrain/pretrain_latentlm.py --preset mllm-1.3b \\
      --data /data/latentlm_mds --save /ckpt/mllm-1.3b --parallel.tensor-parallel 2 --fp8 hybrid

Every field of the preset can be overridden: --model.<field>, --train.<field>, --parallel.<field>;
run options (paths, intervals, numerics) are plain --<field>. Rank and world size come from torchrun
or from Slurm (srun: SLURM_PROCID / SLURM_NTASKS, with MASTER_ADDR / MASTER_PORT set by the launcher).
A run resumes from the latest checkpoint in --save automatically; it refuses a --save that another live
run holds (--lease-wait SECONDS waits for it), and every rank exits when its launcher dies.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlm_mcore.runtime.watchdog import die_with_launcher  # noqa: E402

# first, before the heavy imports: a launcher that dies from here on takes this rank along (under torchrun
# one that died during the interpreter's start-up took its rendezvous store along, so the rank never trains)
die_with_launcher()

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()  # known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)

from latentlm_mcore.config import ModelConfig, ParallelConfig, PRESETS, RunConfig, TrainConfig, get_preset  # noqa: E402
from latentlm_mcore.runtime.cli import add_config_arguments, apply_overrides, config_overrides  # noqa: E402
from latentlm_mcore.runtime.lease import LeaseHeld  # noqa: E402
from latentlm_mcore.training.preflight import PreflightError  # noqa: E402
from latentlm_mcore.training.trainer import pretrain  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    add_config_arguments(parser.add_argument_group("run"), RunConfig)
    add_config_arguments(parser.add_argument_group("model (preset overrides)"), ModelConfig, "model.")
    add_config_arguments(parser.add_argument_group("train (preset overrides)"), TrainConfig, "train.")
    add_config_arguments(parser.add_argument_group("parallel (preset overrides)"), ParallelConfig, "parallel.")
    args = parser.parse_args(argv)

    overrides = {f"{group}.{k}": v for group in ("model", "train", "parallel")
                 for k, v in config_overrides(args, f"{group}.").items()}
    cfg = apply_overrides(get_preset(args.preset), overrides)
    run = apply_overrides(RunConfig(), config_overrides(args, cls=RunConfig))
    try:
        summary = pretrain(cfg, run)
    except PreflightError as e:  # every rank refuses alike; one says why
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            print(f"pretrain_latentlm.py: {e}", file=sys.stderr, flush=True)
        return 2
    except LeaseHeld as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0 if summary["stop_reason"] in ("finished", "exit_after") or summary["stop_reason"].startswith("signal") else 1


if __name__ == "__main__":
    sys.exit(main())
