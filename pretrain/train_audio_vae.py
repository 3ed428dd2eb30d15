"""Train the audio σ-VAE tokenizer (paper §3.3.1).

    python pretrain/train_audio_vae.py --preset tiny --train-data runs/speech_digits/train.jsonl \
        --eval-data runs/speech_digits/heldout.jsonl --train-steps 600 --gan-start-step 300
    torchrun --nproc-per-node 8 pretrain/train_audio_vae.py --preset 15hz --train-data libritts.jsonl ...

Options as the image σ-VAE's (pretrain/train_sigma_vae.py): every field of AudioTrainConfig is a plain
--<field> (train_steps, log_interval, eval_interval, save_interval, clip_grad, gan_start_step), every field of
AudioVAEConfig a --model.<field> that overrides the preset. Re-running with the same --out-dir resumes.
The exported model is <out-dir>/audio_vae.pt (vae/audio_model.load_audio_vae).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.runtime.watchdog import die_with_launcher  # noqa: E402

die_with_launcher()  # first: a launcher that dies from here on takes this rank along

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()

from latentlm_mcore.runtime.cli import add_config_arguments, apply_overrides, config_overrides  # noqa: E402
from latentlm_mcore.runtime.ranks import rank_and_world_from_env  # noqa: E402
from latentlm_mcore.vae.audio_config import AUDIO_VAE_PRESETS, AudioVAEConfig  # noqa: E402
from latentlm_mcore.vae.audio_trainer import AudioSigmaVAETrainer, AudioTrainConfig  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(AUDIO_VAE_PRESETS), default="tiny")
    add_config_arguments(parser.add_argument_group("training"), AudioTrainConfig)
    add_config_arguments(parser.add_argument_group("model (preset overrides)"), AudioVAEConfig, "model.")
    args = parser.parse_args(argv)
    model_cfg = apply_overrides(AUDIO_VAE_PRESETS[args.preset], config_overrides(args, "model."))
    return model_cfg, apply_overrides(AudioTrainConfig(), config_overrides(args, cls=AudioTrainConfig))


def main(argv=None):
    model_cfg, train_cfg = parse_args(argv)
    rank, _, _ = rank_and_world_from_env()  # under srun this also exports RANK etc.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    trainer = AudioSigmaVAETrainer(model_cfg, train_cfg)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    if rank == 0 and result:
        logging.getLogger("train_audio_vae").info(
            "final eval: mel distance %.3f, PESQ-WB %.2f, STOI %.3f, png %s", result["mel_distance"],
            result["pesq_wb"], result["stoi"], result["png"])


if __name__ == "__main__":
    main()
