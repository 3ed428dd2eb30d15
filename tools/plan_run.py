"""Plan a pretraining run: preset + token budget + nodes x GPUs + assumed MFU -> steps, batch, wall time.

  python tools/plan_run.py --preset mllm-1.3b --tokens 1e12 --nodes 16 --gpus-per-node 8 --mfu 0.4
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentlm_mcore.config import PRESETS, RunConfig, get_preset  # noqa: E402
from latentlm_mcore.training.metrics import PEAK_BF16_TFLOPS  # noqa: E402
from latentlm_mcore.data.mixture import parse_proportions  # noqa: E402
from latentlm_mcore.training.plan import mixture_latent_fraction, plan_run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--tokens", type=float, help="token budget (default: the preset's schedule)")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="H100", choices=sorted(PEAK_BF16_TFLOPS), help="for its dense BF16 peak")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
    p.add_argument("--latent-fraction", type=float, default=0.25,
                   help="share of positions that predict an image latent (2:1:1 text:pair:interleaved mix)")
    p.add_argument("--data", nargs="+", help="preprocessed dataset(s): take the latent fraction from their manifests "
                                          "under --proportions, as the loader mixes them")
    p.add_argument("--proportions", default=RunConfig.proportions)
    p.add_argument("--mixture-unit", default=RunConfig.mixture_unit, choices=("tokens", "documents"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    cfg = get_preset(args.preset)
    tokens = args.tokens or cfg.tokens_per_step * cfg.train.train_steps
    latent_fraction = args.latent_fraction
    if args.data:
        latent_fraction = mixture_latent_fraction(args.data, parse_proportions(args.proportions), args.mixture_unit)
    plan = plan_run(cfg, tokens, args.nodes, args.gpus_per_node, args.mfu, PEAK_BF16_TFLOPS[args.gpu],
                    latent_fraction)
    print(json.dumps(asdict(plan), indent=2) if args.json else plan.table())


if __name__ == "__main__":
    main()
