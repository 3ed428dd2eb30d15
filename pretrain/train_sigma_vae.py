"""Train the image σ-VAE tokenizer (paper §2.3, §3.1.3).

    python pretrain/train_sigma_vae.py --preset tiny --train-data IMAGES/ --eval-data HELDOUT/ --train-steps 300
    torchrun --nproc-per-node 8 pretrain/train_sigma_vae.py --preset paper --train-data train.jsonl \
        --vgg16-weights vgg16-397923af.pth --init-encoder beit3_base_patch16_224.pth ...

Options as pretraining's (runtime/cli.py): every field of TrainConfig is a plain --<field> (train_steps,
log_interval, eval_interval, save_interval, clip_grad as in pretrain_latentlm.py), every field of SigmaVAEConfig
a --model.<field> that overrides the preset. A preset with a training recipe (`paper`: 200 epochs, perceptual +
GAN losses) sets TrainConfig defaults too; an explicit --train-steps replaces the recipe's --epochs. Re-running
with the same --out-dir resumes; a run refuses an --out-dir that another live run holds (--lease-wait SECONDS
waits), and dies with its launcher.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.runtime.watchdog import die_with_launcher  # noqa: E402

# first, before the heavy imports: a launcher that dies from here on takes this rank along (under torchrun
# one that died during the interpreter's start-up took its rendezvous store along, so the rank never trains)
die_with_launcher()

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()  # known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)

from latentlm_mcore.runtime.cli import add_config_arguments, apply_overrides, config_overrides  # noqa: E402
from latentlm_mcore.runtime.ranks import rank_and_world_from_env  # noqa: E402
from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAEConfig  # noqa: E402
from latentlm_mcore.vae.image_trainer import SigmaVAETrainer  # noqa: E402
from latentlm_mcore.vae.trainer import TRAIN_PRESETS, TrainConfig  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SIGMA_VAE_PRESETS), default="tiny")
    add_config_arguments(parser.add_argument_group("training"), TrainConfig)
    add_config_arguments(parser.add_argument_group("model (preset overrides)"), SigmaVAEConfig, "model.")
    args = parser.parse_args(argv)
    model_cfg = apply_overrides(SIGMA_VAE_PRESETS[args.preset], config_overrides(args, "model."))
    given = config_overrides(args, cls=TrainConfig)
    if "train_steps" in given and "epochs" in given:
        parser.error("give --train-steps or --epochs, not both")
    recipe = dict(TRAIN_PRESETS.get(args.preset, {}))
    if "train_steps" in given:
        recipe.pop("epochs", None)
    return model_cfg, apply_overrides(TrainConfig(**recipe), given)


def main(argv=None):
    model_cfg, train_cfg = parse_args(argv)
    rank, _, _ = rank_and_world_from_env()  # under srun this also exports RANK etc.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    trainer = SigmaVAETrainer(model_cfg, train_cfg)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if rank == 0 and result:
        logging.getLogger("train_sigma_vae").info("final eval: PSNR %.2f dB, grid %s", result["psnr"], result["grid"])


if __name__ == "__main__":
    main()
