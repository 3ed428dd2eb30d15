"""Plan a pretraining run: preset + token budget + nodes x GPUs + assumed MFU -> steps, batch, wall time;
with --gpu-memory, also the parallel layouts that fit that GPU, best first, and the chosen one's arguments.

  python tools/plan_run.py --preset mllm-1.3b --tokens 1e12 --nodes 16 --gpus-per-node 8 --mfu 0.4
  python tools/plan_run.py --preset mllm-1.3b --nodes 16 --gpu-memory 80
  python tools/plan_run.py --preset mllm-1.3b --nodes 64 --gpu-memory 80 --model.num-layers 80 \\
      --model.hidden-size 8192 --model.ffn-hidden-size 28672 --model.num-attention-heads 64 --model.num-query-groups 8
"""
import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlm_mcore.config import PRESETS, ModelConfig, RunConfig, get_preset  # noqa: E402
from latentlm_mcore.runtime.cli import add_config_arguments, apply_overrides, config_overrides  # noqa: E402
from latentlm_mcore.training.metrics import PEAK_BF16_TFLOPS  # noqa: E402
from latentlm_mcore.data.loader.mixture import parse_proportions  # noqa: E402
from latentlm_mcore.training.plan import mixture_latent_fraction, plan_run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--tokens", type=float, help="token budget (default: the preset's schedule)")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="H100", choices=sorted(PEAK_BF16_TFLOPS), help="for its dense BF16 peak")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    p.add_argument("--latent-fraction", type=float, default=0.25,
                   help="share of positions that predict an image latent (2:1:1 text:pair:interleaved mix)")
    p.add_argument("--gpu-memory", type=float, help="GiB per GPU: list the parallel layouts that fit")
    p.add_argument("--layouts", type=int, default=10, help="how many fitting layouts to list")
    p.add_argument("--data", nargs="+", help="preprocessed dataset(s): take the latent fraction from their manifests "
                                          "under --proportions, as the loader mixes them")
    p.add_argument("--proportions", default=RunConfig.proportions)
    p.add_argument("--mixture-unit", default=RunConfig.mixture_unit, choices=("tokens", "documents"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_arguments(p.add_argument_group("model (preset overrides)"), ModelConfig, "model.")
    return p.parse_args(argv)


def layout_report(args, cfg) -> tuple[str, dict]:
    from latentlm_mcore.training.layouts import layouts_table, search_layouts

    start = time.perf_counter()
    fitting, plans = search_layouts(cfg, args.nodes * args.gpus_per_node, args.gpus_per_node, args.gpu_memory,
                                    PEAK_BF16_TFLOPS[args.gpu], args.mfu, args.latent_fraction)
    seconds = time.perf_counter() - start
    lines = [f"\n{len(fitting)} of {len(plans)} layouts fit {args.gpu_memory:g} GiB per GPU "
             f"(10% kept free; planned in {seconds:.1f} s); best first:", layouts_table(fitting, args.layouts)]
    if fitting:
        lines.append(f"\nchosen: slurm/pretrain_mllm_1.3b.sh {fitting[0].args()}")
    else:
        lines.append("\nnothing fits: the least memory is " + layouts_table(sorted(plans, key=lambda p: p.total_gib), 1))
    data = {"planning_seconds": seconds, "fitting": [dict(asdict(p), args=p.args()) for p in fitting[:args.layouts]]}
    return "\n".join(lines), data


def main(argv=None):
    args = parse_args(argv)
    cfg = get_preset(args.preset)
    overrides = {f"model.{k}": v for k, v in config_overrides(args, "model.").items()}
    if overrides:
        cfg = apply_overrides(cfg, overrides)
        cfg.model.__post_init__()
    tokens = args.tokens or cfg.tokens_per_step * cfg.train.train_steps
    latent_fraction = args.latent_fraction
    if args.data:
        latent_fraction = mixture_latent_fraction(args.data, parse_proportions(args.proportions), args.mixture_unit)
        args.latent_fraction = latent_fraction  # the layout search plans the same mixture
    plan = plan_run(cfg, tokens, args.nodes, args.gpus_per_node, args.mfu, PEAK_BF16_TFLOPS[args.gpu],
                    latent_fraction)
    report, data = layout_report(args, cfg) if args.gpu_memory else ("", {})
    if args.json:
        print(json.dumps(dict(asdict(plan), **({"layouts": data} if data else {})), indent=2))
    else:
        print(plan.table() + report)


if __name__ == "__main__":
    main()
