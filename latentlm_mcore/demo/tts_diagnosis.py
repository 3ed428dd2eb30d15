"""What limits the spoken-digits demo's generated speech: the σ-VAE's latents or the language model.

    python -m latentlm_mcore.demo.tts_diagnosis --checkpoint runs/tts_digits_demo/model \\
        --corpus runs/tts_digits_demo/corpus --output diagnosis.json

Three readings on the held-out utterances of the training voices (`heldout`; `--split train`: utterances training
saw, which tells a model that memorised its data from one that learnt the step), each prompted with its voice's
prompt utterance as the demo's generation is:
- **teacher forced**: the real utterance's latents are the model's input, and the diffusion head samples each
  latent from the hidden state before it (the context is the truth, so errors cannot accumulate). The
  recognizer's accuracy on these against the reconstructions' says how good one step of the model is; free
  generation can only be worse.
- **next-latent error**: the mean squared distance of the teacher-forced samples to the true latents (σ-VAE
  samples as training saw them), beside two baselines that know nothing: repeating the previous latent, and
  a latent from another utterance. A model that has learnt the step sits well below both.
- **latent statistics**: the lag-1 correlation of consecutive latents (μ, and the σ-VAE samples the model is
  trained on), and the share of the samples' variance that is μ rather than σ noise. Latents that look like
  independent draws from frame to frame leave the model little to predict from the past.
"""

import argparse
import json
import sys

import numpy as np
import torch

from latentlm_mcore.demo.speech_corpus import SAMPLE_RATE
from latentlm_mcore.demo.tts_digits import LazyWavs, _accuracy_by_kind, read_split, reconstruct, voice_prompts


def lag1_correlation(runs: list[torch.Tensor]) -> float:
    """Mean over latent channels of the correlation between z[t] and z[t + 1], pooled over runs [n_i, D]."""
    a = torch.cat([r[:-1] for r in runs if len(r) > 1]).double()
    b = torch.cat([r[1:] for r in runs if len(r) > 1]).double()
    a, b = a - a.mean(0), b - b.mean(0)
    return float(((a * b).mean(0) / (a.std(0, correction=0) * b.std(0, correction=0) + 1e-12)).mean())


@torch.no_grad()
def hidden_before_latents(decoder, prompts, latents: torch.Tensor) -> torch.Tensor:
    """Hidden states [len(prompts), n, H] at the positions whose next input is latent k = 1..n of `latents`
    [n, D] (the prompt's closing <BOD>, then latents 1..n-1), the latents given after each prompt: one
    forward pass of a `RecomputeDecoder` for all of them."""
    from latentlm_mcore.inference.generation import _flatten, _left_pad

    n = len(latents)
    ids, z, mask, attention = _left_pad([_flatten(p) + list(latents) for p in prompts], decoder.latent_dim)
    _, hidden = decoder.forward(*(x.to(decoder.device) for x in (ids, z, mask, attention)))
    return hidden[:, ids.shape[1] - n - 1 + torch.arange(n)].float()


@torch.no_grad()
def teacher_forced_latents(generator, voice_latents, text_ids, targets, cfg_scale: float, steps: int, seed: int):
    """For each utterance: the head's sample of latent k from the hidden state before it, the true latents
    1..k-1 given (guidance's unconditional stream in the same batch, as generation runs it)."""
    from latentlm_mcore.diffusion.samplers import classifier_free_guidance, dpm_solver_pp_sample
    from latentlm_mcore.inference.generation import speech_prompts

    dec = generator.decoder
    noise_gen = torch.Generator().manual_seed(seed)
    out = []
    for cond, uncond, z in zip(*speech_prompts(text_ids, voice_latents, generator.special), targets):
        hidden = hidden_before_latents(dec, [cond, uncond], z)
        if cfg_scale != 1.0:
            denoise = classifier_free_guidance(dec.denoise_fn(torch.cat([hidden[0], hidden[1]])), cfg_scale)
        else:
            denoise = dec.denoise_fn(hidden[0])
        noise = torch.randn(len(z), dec.latent_dim, generator=noise_gen).to(dec.device)
        out.append(dpm_solver_pp_sample(denoise, noise, dec.alphas_cumprod, dec.prediction, steps).cpu())
    return out


def diagnose(checkpoint: str, corpus: str, cfg_scale: float | None = None, steps: int = 5, seed: int = 0,
             split: str = "heldout", max_utterances: int | None = None) -> dict:
    from latentlm_mcore.data.prep.audio import resample
    from latentlm_mcore.demo.speech_quality import DigitRecognizer
    from latentlm_mcore.inference.tasks import Generator, read_voice
    from latentlm_mcore.vae.audio_model import pad_to_hop
    from latentlm_mcore.vae.model import sample_sigma_latents

    generator = Generator.from_megatron(checkpoint, use_cache=False)  # all positions' hidden states
    vae = generator.vae.eval()
    rate, stats, c_sigma = vae.config.sample_rate, vae.latent_stats, vae.config.c_sigma
    if cfg_scale is None:  # tools/generate.py's rule for text-to-speech: the preset's, else 4 (paper Fig. 10a)
        cfg_scale = generator.cfg_scale if generator.cfg_scale is not None else 4.0
    prompts = {p["voice"]: p["audio"] for p in voice_prompts(corpus)}
    docs = [d for d in read_split(corpus, split) if d["audio"] != prompts.get(d["voice"])]
    if max_utterances and len(docs) > max_utterances:  # evenly through the split: every voice, text and speed
        docs = docs[::len(docs) // max_utterances][:max_utterances]
    wavs = LazyWavs(corpus)
    noise_gen = torch.Generator().manual_seed(seed)
    mus, samples, voices, texts = [], [], [], []
    for d in docs:
        wav = resample(wavs[d["audio"]], SAMPLE_RATE, rate)
        mu = vae.encode(pad_to_hop(wav, vae.config.hop_length)[None]).float()
        mus.append(stats.scale(mu)[0])
        samples.append(stats.scale(sample_sigma_latents(mu, c_sigma, noise_gen))[0])  # as the loader draws them
        voice = read_voice(f"{corpus}/{prompts[d['voice']]}", rate)
        voices.append(vae.encode_scaled(voice[None])[0])
        texts.append(generator.tokenizer.encode(d["text"]))
    forced = teacher_forced_latents(generator, voices, texts, samples, cfg_scale, steps, seed)

    def heard(latent_runs):
        return [(resample(vae.decode_scaled(z[None])[0, :wavs[d["audio"]].shape[0] * rate // SAMPLE_RATE].float(),
                          rate, SAMPLE_RATE), d["text"]) for z, d in zip(latent_runs, docs)]

    recognizer = DigitRecognizer()
    shifted = samples[1:] + samples[:1]  # another utterance's latents, cut or repeated to the length
    other = [s2[torch.arange(len(s)) % len(s2)] for s, s2 in zip(samples, shifted)]
    mse = lambda pred: float(torch.cat([(p - s).pow(2).mean(1) for p, s in zip(pred, samples)]).mean())
    mu_var = torch.cat(mus).var(0).mean()
    return {
        "checkpoint_iteration": generator_iteration(checkpoint),
        "split": split, "utterances": len(docs), "cfg_scale": cfg_scale, "diffusion_steps": steps,
        "recognizer": {
            "real": _accuracy_by_kind([(wavs[d["audio"]], d["text"]) for d in docs], recognizer),
            "reconstructed": _accuracy_by_kind([(resample(reconstruct(vae, resample(wavs[d["audio"]], SAMPLE_RATE,
                                                                                   rate)), rate, SAMPLE_RATE),
                                                 d["text"]) for d in docs], recognizer),
            "reconstructed_from_samples": _accuracy_by_kind(heard(samples), recognizer),
            "teacher_forced": _accuracy_by_kind(heard(forced), recognizer),
        },
        "next_latent_mse": {
            "teacher_forced": mse(forced),
            "previous_latent": mse([torch.cat([s[:1], s[:-1]]) for s in samples]),
            "other_utterance": mse(other),
        },
        "latents": {
            "frame_rate": vae.config.frame_rate, "latent_dim": vae.config.latent_dim, "c_sigma": c_sigma,
            "lag1_correlation_mu": lag1_correlation(mus),
            "lag1_correlation_samples": lag1_correlation(samples),
            "mu_share_of_sample_variance": float(mu_var / torch.cat(samples).var(0).mean()),
        },
    }


def generator_iteration(checkpoint: str) -> str:
    from latentlm_mcore.training.checkpoint import resolve_checkpoint
    return resolve_checkpoint(checkpoint, None).rstrip("/").rsplit("/", 1)[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the speech model's save directory (or one iter_*)")
    p.add_argument("--corpus", required=True, help="the spoken-digits corpus (data_prep/speech_digits.py)")
    p.add_argument("--output", required=True)
    p.add_argument("--cfg-scale", type=float, help="default: generation's (the preset's, else 4)")
    p.add_argument("--diffusion-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="train: utterances the model was trained on (against heldout: memorised or learnt)")
    p.add_argument("--max-utterances", type=int, help="at most this many, evenly through the split")
    args = p.parse_args(argv)
    from latentlm_mcore.runtime.logs import install_warning_filters
    install_warning_filters()  # before megatron's import: its known-benign warnings once or not at all
    result = diagnose(args.checkpoint, args.corpus, args.cfg_scale, args.diffusion_steps, args.seed,
                      args.split, args.max_utterances)
    from latentlm_mcore.runtime.files import atomic_write
    with atomic_write(args.output, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
