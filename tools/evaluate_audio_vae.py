"""Reconstruction quality of an exported audio σ-VAE on the spoken-digits corpus: tokenizer metrics (mel distance,
PESQ-WB, STOI; vae/audio_metrics.py), pocketsphinx digit accuracy on the reconstructions next to the real speech
(the ceiling), and Resemblyzer similarity between each utterance and its reconstruction.

    python tools/evaluate_audio_vae.py --vae runs/audio_vae/audio_vae.pt --corpus runs/speech_digits \\
        --output bench/results/audio_vae_digits.json

Reconstruction is deterministic (encode -> decode, no σ noise), each utterance whole (right-padded to whole
latents, the padding cut off again). The training run's settings are read from checkpoint.pt next to the VAE
file when it is there; --train-seconds records the wall-clock time the run took.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()  # first: known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentlm_mcore.data.prep.audio import load_audio, resample  # noqa: E402
from latentlm_mcore.demo.speech_corpus import SAMPLE_RATE  # noqa: E402
from latentlm_mcore.demo.speech_quality import DigitRecognizer, SpeakerSimilarity, recognizer_accuracy  # noqa: E402
from latentlm_mcore.vae.audio_metrics import mean_tokenizer_metrics  # noqa: E402
from latentlm_mcore.demo.tts_digits import reconstruct  # noqa: E402
from latentlm_mcore.vae.audio_model import load_audio_vae  # noqa: E402

TRAIN_KEYS = ("train_steps", "batch_size", "crop_seconds", "lr", "gan_start_step", "gan_loss", "mel_weight",
              "adversarial_weight", "feature_matching_weight", "disc_channels")


def evaluate_split(vae, corpus: str, split: str, recognizer, similarity) -> dict:
    rate = vae.config.sample_rate
    real, recon, pairs, sims = [], [], [], []
    with open(os.path.join(corpus, f"{split}.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for doc in docs:
        text = next(s["text"] for s in doc["segments"] if "text" in s)
        seg = next(s for s in doc["segments"] if "audio" in s)
        wav = load_audio(os.path.join(corpus, seg["audio"]), rate, seg.get("start"), seg.get("end"), doc_id=doc["id"])
        out = reconstruct(vae, wav)
        pairs.append((out, wav))
        wav16, out16 = resample(wav, rate, SAMPLE_RATE), resample(out, rate, SAMPLE_RATE)  # the recognizer's rate
        real.append((wav16, text))
        recon.append((out16, text))
        sims.append(similarity(wav16, out16))
    mean = mean_tokenizer_metrics(pairs, rate)
    return {"utterances": len(docs), **mean, "speaker_similarity_to_real": float(np.mean(sims)),
            "recognizer_real": recognizer_accuracy(real, recognizer),
            "recognizer_reconstructed": recognizer_accuracy(recon, recognizer)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="audio_vae.pt written by pretrain/train_audio_vae.py")
    p.add_argument("--corpus", required=True, help="folder written by data_prep/speech_digits.py")
    p.add_argument("--splits", default="heldout,heldout_voice", help="comma-separated corpus splits")
    p.add_argument("--train-seconds", type=float, help="wall-clock seconds the training run took (recorded)")
    p.add_argument("--output", help="write the report here as JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    vae = load_audio_vae(args.vae)
    cfg = vae.config
    report = {"vae": {"sample_rate": cfg.sample_rate, "frame_rate": cfg.frame_rate, "latent_dim": cfg.latent_dim,
                      "strides": list(cfg.strides), "channels": cfg.channels, "c_sigma": cfg.c_sigma,
                      "parameters": sum(p.numel() for p in vae.parameters())}}
    ckpt = os.path.join(os.path.dirname(os.path.abspath(args.vae)), "checkpoint.pt")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        report["training"] = {"steps_done": state["step"], **{k: state["train_config"][k] for k in TRAIN_KEYS},
                              "device": "cpu", "train_seconds": args.train_seconds}
    recognizer, similarity = DigitRecognizer(), SpeakerSimilarity()
    for split in args.splits.split(","):
        report[split] = evaluate_split(vae, args.corpus, split, recognizer, similarity)
    report["recognizer"] = "pocketsphinx en-us, JSGF grammar of the ten digit words"
    report["speaker_similarity"] = "Resemblyzer cosine between each real utterance and its reconstruction"
    text = json.dumps(report, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
