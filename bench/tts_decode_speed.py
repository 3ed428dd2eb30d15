"""Text-to-speech decode speed: seconds of audio per second of wall time at 15 / 7.5 / 3.75 Hz latents
vs a 75 Hz codec-rate baseline (paper §3.3, Table 4: a lower frame rate means fewer decoding steps).

One model size for every rate; only the latent rate and dimension change, as in the paper. Per rate the
LM generates `--seconds` of speech for `--batch` text prompts with the KV cache, the paper's sampler
(DPM-Solver++, 5 head steps, Fig. 10) and classifier-free guidance 4, in generation's speech layout
(inference/generation.py speech_prompts: `<END_OF_DOCUMENT> <BOD>` 3 s of voice latents `<EOD>` text `<BOD>`,
the unconditional rows the same without the text, in the same batch; the stop test runs at every latent, with
the LM head's <EOD> and <LATENT> rows zeroed so a run is never stopped early). Then the audio σ-VAE of that
rate decodes the latents streaming (one latent per call with a StreamCache, as a live player would), timed
separately. Random weights: speed does not depend on what the weights are.

The 75 Hz baseline: strides (2, 4, 5, 8) = 320x at 24 kHz, latent dim 8. Dim 8 keeps the floats per second of
audio comparable (75 x 8 = 600 vs 480 at the paper's three rates), so the baseline differs in frame rate,
not in how much it has to say per second; that is the codec-rate regime (EnCodec-like 75 Hz frames).

  python bench/tts_decode_speed.py                      # small CPU size, writes bench/results/tts_decode_speed.json
  python bench/tts_decode_speed.py --size tts-24l --device cuda
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import latentlm_mcore.hf  # noqa: E402,F401
from latentlm_mcore.config import PRESETS  # noqa: E402
from latentlm_mcore.hf.configuration_latentlm import LatentLMHFConfig  # noqa: E402
from latentlm_mcore.hf.modeling_latentlm import LatentLMForCausalLM  # noqa: E402
from latentlm_mcore.inference.generation import SamplingConfig, generate, speech_prompts  # noqa: E402
from latentlm_mcore.vae.audio_config import AUDIO_VAE_PRESETS, AudioVAEConfig  # noqa: E402
from latentlm_mcore.vae.audio_model import AudioSigmaVAE, StreamCache  # noqa: E402

RATES = {  # name -> audio σ-VAE config at 24 kHz
    "15hz": AUDIO_VAE_PRESETS["15hz"],
    "7.5hz": AUDIO_VAE_PRESETS["7.5hz"],
    "3.75hz": AUDIO_VAE_PRESETS["3.75hz"],
    "75hz_baseline": AudioVAEConfig(sample_rate=24000, strides=(2, 4, 5, 8), latent_dim=8, blocks_per_stage=3),
}
SIZES = {  # name -> (layers, hidden, ffn, heads, head_layers, narrow σ-VAE for a CPU)
    "tiny": (2, 64, 128, 2, 2, True),
    "small": (4, 128, 512, 4, 3, True),
    "tts-24l": None,  # the preset (config.py), paper-width σ-VAEs
}
VOCAB = 1024  # text ids below 1000; the specials above (the vocabulary size does not change decode steps)
TEXT_TOKENS = 32  # prompt length in text ids
VOICE_SECONDS = 3.0  # the voice prompt, as generation cuts it (inference/tasks.py read_voice)


def lm_shape(size: str):
    if SIZES[size] is None:
        m = PRESETS[size]().model
        return m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.head_layers, False
    return SIZES[size]


def build_lm(size: str, latent_dim: int, latents: int, device) -> LatentLMForCausalLM:
    layers, hidden, ffn, heads, head_layers, _ = lm_shape(size)
    config = LatentLMHFConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
        max_position_embeddings=TEXT_TOKENS + 2 * latents + 8, latent_dim=latent_dim, head_layers=head_layers,
        bod_token_id=1000, eod_token_id=1001, latent_token_id=1002, end_of_document_token_id=1003,
        latents_per_image=latents)
    torch.manual_seed(0)
    model = LatentLMForCausalLM(config).eval()
    with torch.no_grad():  # AdaLN-Zero would make every latent exactly zero: give the head some weights
        for p in model.diffusion_head.parameters():
            p.add_(0.02 * torch.randn_like(p))
        # random weights would end a speech run by <EOD> at a random latent; equal <EOD> / <LATENT> logits never
        # prefer <EOD>, so every run is the timed length (the stop test itself still runs at every latent)
        model.lm_head.weight[[config.eod_token_id, config.latent_token_id]] = 0
    return model.to(device)


def build_vae(rate: str, size: str, device) -> AudioSigmaVAE:
    cfg = RATES[rate]
    if lm_shape(size)[5]:  # a CPU-sized decoder: the same strides and dims, narrow stages
        cfg = cfg.replace(channels=8, max_channels=128, blocks_per_stage=1)
    torch.manual_seed(0)
    return AudioSigmaVAE(cfg).eval().to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_rate(rate: str, args, device) -> dict:
    vae_cfg = RATES[rate]
    latents = max(1, round(args.seconds * vae_cfg.frame_rate))
    audio_s = latents * vae_cfg.hop_length / vae_cfg.sample_rate
    model = build_lm(args.size, vae_cfg.latent_dim, latents, device)
    special = model.special_tokens()
    g = torch.Generator().manual_seed(1)
    voice = max(1, round(min(VOICE_SECONDS, args.seconds) * vae_cfg.frame_rate))
    texts = [torch.randint(0, 1000, (TEXT_TOKENS,), generator=g).tolist() for _ in range(args.batch)]
    voices = [torch.randn(voice, vae_cfg.latent_dim, generator=g).to(device) for _ in range(args.batch)]
    prompts, uncond = speech_prompts(texts, voices, special)  # generation's layout: voice <EOD> text <BOD>
    sampling = SamplingConfig(cfg_scale=4.0, diffusion_steps=5, seed=0, stop_after_images=1,
                              max_run_latents=latents, max_new_tokens=latents + 1)
    decoder = model.decoder(True)
    with torch.no_grad():
        generate(decoder, prompts[:1], special, SamplingConfig(max_new_tokens=4), progress=False)  # warm-up
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        samples = generate(decoder, prompts, special, sampling, uncond_prompts=uncond, progress=False)
        sync(device)
        lm_s, lm_cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert all(s.run_ends == ["max"] for s in samples)
        z = torch.stack([s.images[0] for s in samples]).to(device)  # [batch, latents, dim]
        assert z.shape == (args.batch, latents, vae_cfg.latent_dim), z.shape

        vae = build_vae(rate, args.size, device)
        vae.decode(z[:, :1])  # warm-up
        sync(device)
        wall, cpu, cache, chunks = time.perf_counter(), time.process_time(), StreamCache(), []
        for t in range(latents):  # streaming: one latent per call, as audio is played while it is generated
            chunks.append(vae.decode(z[:, t:t + 1], cache))
        sync(device)
        vae_s, vae_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wav = torch.cat(chunks, dim=1)
    assert wav.shape == (args.batch, latents * vae_cfg.hop_length) and torch.isfinite(wav).all()
    total_audio = args.batch * audio_s
    return {"frame_rate_hz": vae_cfg.frame_rate, "latent_dim": vae_cfg.latent_dim, "hop_length": vae_cfg.hop_length,
            "latents_per_utterance": latents, "audio_seconds_per_utterance": audio_s,
            "lm_wall_s": lm_s, "vae_decode_wall_s": vae_s, "lm_cpu_s": lm_cpu, "vae_decode_cpu_s": vae_cpu,
            "audio_s_per_wall_s": {"lm": total_audio / lm_s, "vae_decode": total_audio / vae_s,
                                   "lm_plus_vae": total_audio / (lm_s + vae_s)},
            # one thread: CPU seconds barely depend on the machine's load, so they are the steadier figure there
            "audio_s_per_cpu_s": {"lm": total_audio / lm_cpu, "vae_decode": total_audio / vae_cpu,
                                  "lm_plus_vae": total_audio / (lm_cpu + vae_cpu)},
            "lm_parameters": sum(p.numel() for p in model.parameters()),
            "vae_decoder_parameters": sum(p.numel() for p in vae.decoder.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--seconds", type=float, default=8.0, help="audio generated per utterance")
    p.add_argument("--batch", type=int, default=1, help="utterances per batch (CFG doubles the decoder batch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "tts_decode_speed.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if device.type == "cpu":
        torch.set_num_threads(1)  # on a shared CPU, OpenMP threads spinning against other processes are erratic
    results = {rate: run_rate(rate, args, device) for rate in RATES}
    base = results["75hz_baseline"]["audio_s_per_wall_s"]
    base_cpu = results["75hz_baseline"]["audio_s_per_cpu_s"]
    for r in results.values():
        r["speedup_vs_75hz"] = {k: v / base[k] for k, v in r["audio_s_per_wall_s"].items()}
        r["speedup_vs_75hz_cpu_s"] = {k: v / base_cpu[k] for k, v in r["audio_s_per_cpu_s"].items()}
    layers, hidden, ffn, heads, head_layers, narrow = lm_shape(args.size)
    result = {
        "what": "seconds of audio per second of wall time, text-to-speech with the KV cache, per latent rate",
        "size": args.size, "device": device.type, "seconds": args.seconds, "batch": args.batch,
        "cfg_scale": 4.0, "diffusion_steps": 5, "text_tokens": TEXT_TOKENS, "voice_prompt_seconds": VOICE_SECONDS,
        "model": {"layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads, "head_layers": head_layers},
        "vae": "narrow CPU decoders (channels 8..128, 1 block per stage)" if narrow else "paper-width presets",
        "results": results,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for rate, r in results.items():
        print(f"{rate:>14}: {r['latents_per_utterance']:4d} latents  LM {r['audio_s_per_wall_s']['lm']:8.2f} "
              f"audio-s/s  σ-VAE {r['audio_s_per_wall_s']['vae_decode']:8.2f} audio-s/s  "
              f"LM x{r['speedup_vs_75hz']['lm']:.2f} vs 75 Hz")


if __name__ == "__main__":
    main()
