"""Megatron distributed checkpoint (any TP/PP) -> Hugging Face folder.

The folder holds: `config.json` (with `auto_map`), the remote code (our configuration and modeling
files and what they import, copied from this package with `latentlm_mcore...` imports made
relative), sharded safetensors, the tokenizer (`tokenizer.json`, a fast BPE tokenizer with our special
tokens at their ids), the σ-VAE (`sigma_vae.safetensors` + `sigma_vae.json` with the latent
statistics; a speech model's audio σ-VAE as `audio_vae.safetensors` + `audio_vae.json`),
`generation_config.json` and a model card. Backbone names and layout are Llama's.

Megatron -> Llama layout: `linear_qkv` is interleaved per query group ([groups, (heads_per_group + 2)
* head_dim, hidden]: the group's queries, then its key, then its value); `linear_fc1` is [gate; up].
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from latentlm_mcore.config import ModelConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# package module -> file name in the exported folder. Every `latentlm_mcore` import in these files
# must be one of these modules (checked when copying).
REMOTE_CODE = {
    "latentlm_mcore.hf.configuration_latentlm": "configuration_latentlm.py",
    "latentlm_mcore.hf.modeling_latentlm": "modeling_latentlm.py",
    "latentlm_mcore.inference.generation": "generation.py",
    "latentlm_mcore.diffusion.samplers": "samplers.py",
    "latentlm_mcore.diffusion.schedule": "schedule.py",
    "latentlm_mcore.model.diffusion_head": "diffusion_head.py",
    "latentlm_mcore.vae.model": "sigma_vae_model.py",
    "latentlm_mcore.vae.config": "sigma_vae_config.py",
    "latentlm_mcore.vae.stats": "sigma_vae_stats.py",
    "latentlm_mcore.vae.audio_model": "audio_vae_model.py",
    "latentlm_mcore.vae.audio_config": "audio_vae_config.py",
    "latentlm_mcore.runtime.files": "atomic_files.py",  # the σ-VAE savers write atomically
}
AUTO_MAP = {"AutoConfig": "configuration_latentlm.LatentLMHFConfig",
            "AutoModelForCausalLM": "modeling_latentlm.LatentLMForCausalLM"}


# ---------------------------------------------------------------- weights
def megatron_to_hf_state_dict(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full (TP=1) LatentLMModel state dict -> LatentLMForCausalLM names and layouts."""
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    head_dim, per_group = cfg.kv_channels, heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"],
           "latent_projection.weight": state["latent_projection.weight"]}
    out["lm_head.weight"] = state["embedding.word_embeddings.weight" if cfg.tie_embeddings else "output_layer.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].reshape(groups, per_group + 2, head_dim, -1)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(heads * head_dim, -1)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(groups * head_dim, -1)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(groups * head_dim, -1)
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
    for name, tensor in state.items():
        if name.startswith("diffusion_head."):
            out[name] = tensor
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def hf_config(cfg: ModelConfig, special: dict | None, latents_per_image: int | None, dtype: torch.dtype):
    from latentlm_mcore.hf.configuration_latentlm import LatentLMHFConfig

    special = special or {}
    config = LatentLMHFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads, head_dim=cfg.kv_channels,
        hidden_act="silu", max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
        rope_theta=float(cfg.rotary_base), attention_bias=False, mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, torch_dtype=dtype,
        latent_dim=cfg.latent_dim, head_hidden_size=cfg.head_hidden_size, head_ffn_hidden_size=cfg.head_ffn_hidden_size,
        head_layers=cfg.head_layers, timestep_embedding_dim=cfg.timestep_embedding_dim,
        num_timesteps=cfg.num_timesteps, prediction=cfg.prediction,
        bod_token_id=special.get("<BOD>"), eod_token_id=special.get("<EOD>"),
        latent_token_id=special.get("<LATENT>"), end_of_document_token_id=special.get("<END_OF_DOCUMENT>"),
        pad_token_id=special.get("<PAD>"), eos_token_id=special.get("<END_OF_DOCUMENT>"),
        latents_per_image=latents_per_image,
        # a class vocabulary (tokenizer.ClassVocabulary): classes are ids 0..N-1 and <NULL_CLASS> is N
        num_classes=special.get("<NULL_CLASS>"), null_class_token_id=special.get("<NULL_CLASS>"))
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["LatentLMForCausalLM"]
    return config


# ---------------------------------------------------------------- remote code, tokenizer, σ-VAE
_IMPORT = re.compile(r"^(\s*from\s+)(latentlm_mcore(?:\.\w+)*)(\s+import\b)", re.MULTILINE)


def remote_code_source(module: str) -> str:
    """The source of `module` with its package imports rewritten to the folder's flat relative ones."""
    path = PACKAGE_ROOT.parent / (module.replace(".", "/") + ".py")
    source = path.read_text()

    def relative(match):
        target = match.group(2)
        if target not in REMOTE_CODE:
            raise RuntimeError(f"{path}: imports {target}, which the Hugging Face export does not ship; "
                               f"add it to REMOTE_CODE or import it lazily")
        return f"{match.group(1)}.{REMOTE_CODE[target][:-3]}{match.group(3)}"

    source = _IMPORT.sub(relative, source)
    leftover = re.search(r"^\s*(from|import)\s+latentlm_mcore\b.*$", source, re.MULTILINE)
    if leftover:
        raise RuntimeError(f"{path}: import not expressible in the export: {leftover.group(0).strip()!r}")
    return source


def write_remote_code(folder: str) -> None:
    for module, filename in REMOTE_CODE.items():
        Path(folder, filename).write_text(remote_code_source(module))


def write_tokenizer(tokenizer, folder: str) -> None:
    """A `tiktoken` tokenizer of latentlm_mcore.data -> tokenizer.json (fast byte-level BPE) with every
    special token at its id, loadable by `AutoTokenizer.from_pretrained(folder)`."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers import Regex
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from latentlm_mcore.data.tokenizer import write_tiktoken_file

    encoding = tokenizer._enc
    # Oniguruma (tokenizers) reads `{1,3}+` as "one or more runs of 1-3" rather than possessive:
    # "1234" would stay one pre-token. Plain `{1,3}` splits digits as tiktoken does.
    pattern = encoding._pat_str.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
    with tempfile.TemporaryDirectory() as tmp:  # the ranks in use: cl100k_base:N keeps only the first N
        rank_file = os.path.join(tmp, "ranks.tiktoken")
        write_tiktoken_file(tokenizer.ranks, rank_file)
        converter = TikTokenConverter(vocab_file=rank_file, pattern=pattern)
        vocab, merges = converter.extract_vocab_merges_from_model(rank_file)
    specials = {**encoding._special_tokens, **tokenizer.special_ids}
    vocab.update(specials)  # present in the vocabulary, so the added tokens keep these exact ids
    fast = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    fast.model.ignore_merges = True  # tiktoken looks a whole pre-token up before merging
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # split_special_tokens: text that spells "<BOD>" stays text, as in the training data (documents
    # cannot inject control tokens); the ids of the special tokens are still there for prompts
    wrapped = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<END_OF_DOCUMENT>", pad_token="<PAD>",
                                      additional_special_tokens=list(tokenizer.special_ids), split_special_tokens=True)
    wrapped.save_pretrained(folder)


def write_sigma_vae(vae, folder: str) -> None:
    """The σ-VAE as safetensors + a JSON config (loaded without pickle): an image one, or a speech model's audio one."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from latentlm_mcore.hf.modeling_latentlm import (AUDIO_VAE_CONFIG, AUDIO_VAE_WEIGHTS, SIGMA_VAE_CONFIG,
                                                     SIGMA_VAE_WEIGHTS)
    from latentlm_mcore.inference.tasks import is_audio_vae

    config_name, weights_name = ((AUDIO_VAE_CONFIG, AUDIO_VAE_WEIGHTS) if is_audio_vae(vae)
                                 else (SIGMA_VAE_CONFIG, SIGMA_VAE_WEIGHTS))
    weights = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    save_file(weights, os.path.join(folder, weights_name))
    stats = vae.latent_stats.to_dict() if vae.latent_stats is not None else None
    with open(os.path.join(folder, config_name), "w") as f:
        json.dump({"config": asdict(vae.config), "latent_stats": stats}, f, indent=2)


def write_model_card(folder: str, cfg, source: str, dtype: str, has_vae: bool, has_tokenizer: bool,
                     speech: bool = False) -> None:
    from latentlm_mcore.config import count_parameters

    params = count_parameters(cfg.model)
    card = f"""---
library_name: transformers
tags: [latentlm, next-token-diffusion, multimodal]
---
# LatentLM ({cfg.name})

Multimodal latent language model ("Multimodal Latent Language Modeling with Next-Token Diffusion",
arXiv 2412.08635), converted from the Megatron checkpoint `{source}` by `tools/convert_ckpt_to_hf.py`.

- backbone: Llama layout, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, FFN
  {cfg.model.ffn_hidden_size}, {cfg.model.num_attention_heads} heads, vocab {cfg.model.vocab_size}
  ({params['total']:,} parameters in all, {params['diffusion_head']:,} in the diffusion head)
- latents: dim {cfg.model.latent_dim}, diffusion head of {cfg.model.head_layers} layers,
  {cfg.model.prediction}-prediction on a {cfg.model.num_timesteps}-step cosine schedule
- weights: {dtype}; tokenizer: {'included' if has_tokenizer else 'not included'};
  σ-VAE: {'included' if has_vae else 'not included'}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # tokenizer.json: no custom code
c = model.config
prompt = [c.end_of_document_token_id, *tok.encode("a photo of a cat", add_special_tokens=False), c.bod_token_id]
sample = model.generate_mixed([prompt], cfg_scale=1.65, stop_after_images=1, max_new_tokens=c.latents_per_image + 1)[0]
vae = model.load_sigma_vae()
image = vae.decode(vae.latent_stats.unscale(sample.images[0][None]))  # [1, 3, H, W] in [-1, 1]
```
Or, from the latentlm_mcore repository:
`python tools/generate.py --hf <this folder> --task text-to-image --prompt "..." --output out/`.

The text part alone also loads as a plain `LlamaForCausalLM` (the latent projection and diffusion head
weights are then reported as unused).
"""
    if speech:
        card += """
Text -> speech (this export's σ-VAE is an audio one):
```python
import soundfile as sf, torch
vae = model.load_audio_vae()
wav, rate = sf.read("voice.wav", dtype="float32")  # mono, at vae.config.sample_rate (resample it first otherwise)
voice = vae.encode_scaled(torch.from_numpy(wav[: 3 * rate])[None])[0]  # its first 3 s
sample = model.generate_speech([tok.encode("seven two", add_special_tokens=False)], [voice])[0]
audio = vae.decode_scaled(sample.images[0][None])[0]  # sample.run_ends[0]: "eod" or "max"
```
Or `python tools/generate.py --hf <this folder> --task text-to-speech --prompt "..." --voice voice.wav --output out/`.
"""
    Path(folder, "README.md").write_text(card)


# ---------------------------------------------------------------- the whole conversion
def convert_checkpoint(checkpoint: str, output: str, iteration: int | None = None, dtype: str = "fp32",
                       tokenizer: str | None = None, sigma_vae: str | None = None, overwrite: bool = False,
                       max_shard_size: str = "2GB", use_ema: bool = False) -> str:
    """Write the Hugging Face folder of a Megatron checkpoint; returns the checkpoint directory used.
    `use_ema`: export the checkpoint's EMA of the weights (training/ema.py) instead of the raw weights.

    `tokenizer` / `sigma_vae` default to the checkpoint's Provenance (the σ-VAE found by its hash, see
    training/provenance.py); without them the folder has no tokenizer / σ-VAE (said in the model card)."""
    from transformers import GenerationConfig

    from latentlm_mcore.hf.modeling_latentlm import LatentLMForCausalLM
    from latentlm_mcore.inference.megatron import load_megatron_model

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    output = os.path.abspath(output)
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    from latentlm_mcore.training.provenance import resolve_sigma_vae

    model, cfg, provenance, directory = load_megatron_model(checkpoint, iteration, use_ema=use_ema)
    tokenizer = tokenizer or provenance.tokenizer
    sigma_vae = resolve_sigma_vae(provenance, directory, explicit=sigma_vae)  # by hash, wherever it moved
    tok = vae = None
    if tokenizer:
        from latentlm_mcore.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} needs a vocabulary of {tok.vocab_size}, the model has "
                             f"{cfg.model.vocab_size}")
    if sigma_vae:
        from latentlm_mcore.vae import load_vae
        vae = load_vae(sigma_vae)  # image or audio, by the file's kind
        if vae.latent_stats is None:
            raise ValueError(f"σ-VAE {sigma_vae} has no latent statistics; the model's latents are scaled by them")
        if vae.config.latent_dim != cfg.model.latent_dim:
            raise ValueError(f"σ-VAE {sigma_vae} has latent_dim {vae.config.latent_dim}, the model "
                             f"{cfg.model.latent_dim}")

    from latentlm_mcore.inference.tasks import is_audio_vae

    audio = is_audio_vae(vae)
    config = hf_config(cfg.model, tok.special_ids if tok else None,
                       vae.config.num_latents if vae is not None and not audio else None, torch_dtype)
    config.cfg_scale = cfg.cfg_scale
    config.audio_frame_rate = vae.config.frame_rate if audio else None
    hf_model = LatentLMForCausalLM(config)
    hf_model.load_state_dict(megatron_to_hf_state_dict(model.state_dict(), cfg.model), strict=True)
    hf_model.to(torch_dtype)

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)  # a failed conversion leaves no half folder
    try:
        hf_model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        write_remote_code(staging)
        GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=True,
                         temperature=1.0, top_p=0.9, max_new_tokens=256).save_pretrained(staging)
        if tok is not None and not hasattr(tok, "num_classes"):  # class ids live in config.json, no text
            write_tokenizer(tok, staging)
        if vae is not None:
            write_sigma_vae(vae, staging)
        write_model_card(staging, cfg, directory, dtype, vae is not None, tok is not None, speech=audio)
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        os.chmod(staging, 0o755)  # mkdtemp made it private
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
