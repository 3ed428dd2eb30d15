"""Image generation throughput with the KV cache vs recomputing the whole prefix at every latent.

Paper 3.1.4: LatentLM runs the backbone once per latent and only the small diffusion head iterates
(DPM-Solver++, 20 steps). Measured for both backends, each with the same weights, prompts and seed,
one after the other in this process: the Hugging Face model (transformers' DynamicCache vs
recompute) and the Megatron model (megatron's StaticInferenceContext vs recompute). Class-conditional
prompts (`<END_OF_DOCUMENT> class <BOD>`), 256 latents per image, classifier-free guidance (the
decoder batch is twice the image batch). The images must agree; the ratios of images/s are the result.

  python bench/generate.py            # writes bench/results/generate.json
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
from latentlm_mcore.hf.configuration_latentlm import LatentLMHFConfig  # noqa: E402
from latentlm_mcore.hf.modeling_latentlm import LatentLMForCausalLM  # noqa: E402
from latentlm_mcore.inference.generation import SamplingConfig, generate  # noqa: E402


def build_model(args) -> LatentLMForCausalLM:
    vocab = 1024  # ImageNet-style: 1000 classes + specials (appendix A)
    config = LatentLMHFConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 32, head_dim=32,
        max_position_embeddings=args.latents + 8, latent_dim=32, head_layers=3, bod_token_id=1000,
        eod_token_id=1001, latent_token_id=1002, end_of_document_token_id=1003, latents_per_image=args.latents)
    return random_model(config)


def random_model(config: LatentLMHFConfig) -> LatentLMForCausalLM:
    """A seeded random model whose diffusion head is not the zero map of its AdaLN-Zero init."""
    torch.manual_seed(0)
    model = LatentLMForCausalLM(config).eval()
    with torch.no_grad():  # AdaLN-Zero would make every latent exactly zero: give the head some weights
        for p in model.diffusion_head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def megatron_copy(hf_model: LatentLMForCausalLM):
    """The same network as a Megatron LatentLMModel (TP=1, local layers), weights copied from HF."""
    from latentlm_mcore.config import ModelConfig, ParallelConfig
    from latentlm_mcore.inference.megatron import init_single_process
    from latentlm_mcore.model import build_model, local_block_spec, transformer_config

    c = hf_model.config
    cfg = ModelConfig(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
                      num_attention_heads=c.num_attention_heads, vocab_size=c.vocab_size,
                      seq_length=c.max_position_embeddings, latent_dim=c.latent_dim, head_layers=c.head_layers,
                      norm_eps=c.rms_norm_eps, rotary_base=int(c.rope_theta))
    init_single_process()
    model = build_model(cfg, transformer_config(cfg, ParallelConfig()), block_spec=local_block_spec(
        transformer_config(cfg, ParallelConfig()))).eval()
    hf = hf_model.state_dict()
    state = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
             "decoder.final_layernorm.weight": hf["model.norm.weight"], "output_layer.weight": hf["lm_head.weight"],
             "latent_projection.weight": hf["latent_projection.weight"]}
    h, hd = c.num_attention_heads, c.head_dim
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (hf[src + f"self_attn.{x}_proj.weight"].reshape(h, 1, hd, -1) for x in "qkv")
        state[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(3 * h * hd, -1)
        state[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        state[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"],
                                                          hf[src + "mlp.up_proj.weight"]])
        state[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
        state[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        state[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
    state.update({k: v for k, v in hf.items() if k.startswith("diffusion_head.")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return model


def timed(decoder, prompts, special, sampling):
    """(samples, wall seconds, CPU seconds of this process). With one thread the CPU time barely
    depends on what else the machine runs, so the ratios use it; wall-clock figures are reported too."""
    wall, cpu = time.perf_counter(), time.process_time()
    samples = generate(decoder, prompts, special, sampling, progress=True)
    return samples, time.perf_counter() - wall, time.process_time() - cpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="images per batch")
    p.add_argument("--latents", type=int, default=256, help="latents per image (16 x 16, paper 3.1)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "generate.json"))
    args = p.parse_args()
    # one thread: on a shared CPU, OpenMP threads spinning against other processes make timings erratic
    torch.set_num_threads(1)
    model = build_model(args)
    special = model.special_tokens()
    prompts = [[special.end_of_document, cls, special.bod] for cls in range(args.images)]
    sampling = SamplingConfig(cfg_scale=1.65, diffusion_steps=20, seed=0, stop_after_images=1,
                              max_new_tokens=args.latents + 1)
    from latentlm_mcore.inference.megatron import megatron_decoder

    megatron = megatron_copy(model)
    decoders = {"hf_kv_cache": model.decoder(True), "hf_recompute": model.decoder(False),
                "megatron_kv_cache": megatron_decoder(megatron, True),
                "megatron_recompute": megatron_decoder(megatron, False)}
    samples, wall, cpu = {}, {}, {}
    with torch.no_grad():
        for name, decoder in decoders.items():
            generate(decoder, prompts[:1], special, SamplingConfig(max_new_tokens=4), progress=False)  # warm-up
            samples[name], wall[name], cpu[name] = timed(decoder, prompts, special, sampling)
    reference = samples["hf_kv_cache"]
    assert all(len(s.images) == 1 and s.images[0].shape[0] == args.latents for s in reference)
    max_diff = {name: max((a.images[0] - b.images[0]).abs().max().item() for a, b in zip(reference, runs))
                for name, runs in samples.items() if name != "hf_kv_cache"}

    result = {
        "what": "images/s generating class-conditional images, KV cache vs recomputing the prefix per latent",
        "latents_per_image": args.latents, "images": args.images, "cfg_scale": sampling.cfg_scale,
        "diffusion_steps": sampling.diffusion_steps,
        "model": {"layers": args.layers, "hidden": args.hidden, "ffn": 4 * args.hidden, "head_layers": 3,
                  "latent_dim": 32},
        "images_per_cpu_s": {name: args.images / t for name, t in cpu.items()},
        "images_per_wall_s": {name: args.images / t for name, t in wall.items()},
        "hf_kv_cache_speedup": cpu["hf_recompute"] / cpu["hf_kv_cache"],
        "megatron_kv_cache_speedup": cpu["megatron_recompute"] / cpu["megatron_kv_cache"],
        "hf_kv_cache_speedup_wall": wall["hf_recompute"] / wall["hf_kv_cache"],
        "megatron_kv_cache_speedup_wall": wall["megatron_recompute"] / wall["megatron_kv_cache"],
        "max_abs_latent_diff_vs_hf_kv_cache": max_diff,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
                    or platform.machine(), "cuda": torch.cuda.is_available()},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
