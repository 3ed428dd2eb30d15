"""A Megatron checkpoint, saved at any TP/PP, loaded into one process for inference and conversion.

megatron's dist checkpoints store every tensor by its global name and offsets, so a TP=1/PP=1 model
built in one process (a world of one, gloo) loads any layout's checkpoint with full tensors.

The Megatron backend of the generation loop uses megatron's own KV cache (`StaticInferenceContext`,
passed through `LatentLMModel.forward(inference_context=...)`), or recomputes the whole prefix at
every step (`RecomputeDecoder`), the reference both caches are checked against.
"""
from __future__ import annotations

import os

import torch

from latentlm_mcore.config import ParallelConfig
from latentlm_mcore.inference.generation import Decoder, RecomputeDecoder
from latentlm_mcore.runtime.ranks import become_world_of_one


def init_single_process() -> None:
    """megatron's parallel state for one process (TP=1, PP=1), starting a gloo group if none exists."""
    from latentlm_mcore.training.distributed import init_distributed

    if not torch.distributed.is_initialized():
        become_world_of_one()
    elif torch.distributed.get_world_size() != 1:
        raise RuntimeError("loading for inference needs a world of one process; run it outside torchrun")
    init_distributed(ParallelConfig(), seed=0)


def load_megatron_model(checkpoint: str, iteration: int | None = None, use_ema: bool = False):
    """(LatentLMModel at TP=1/PP=1 in eval mode, LatentLMConfig, its Provenance, checkpoint directory).

    `checkpoint` is a save directory (its `latest` is used unless `iteration` is given) or one
    `iter_*` directory. `use_ema`: the weights are the checkpoint's EMA (training/ema.py) instead of the raw
    ones. Raises FileNotFoundError / RuntimeError naming what is missing (ValueError: no EMA in it)."""
    from megatron.core import dist_checkpointing

    from latentlm_mcore.model import build_model, local_block_spec, transformer_config
    from latentlm_mcore.training.checkpoint import load_model, load_run_config, resolve_checkpoint
    from latentlm_mcore.training.step import compute_device

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    directory = resolve_checkpoint(checkpoint, iteration)
    cfg, provenance = load_run_config(directory)
    missing = missing_shard_files(directory)
    if missing:
        raise FileNotFoundError(f"{directory}: incomplete checkpoint, shard files missing or truncated: {missing}")
    init_single_process()
    config = transformer_config(cfg.model, ParallelConfig())
    model = build_model(cfg.model, config, block_spec=local_block_spec(config))
    try:
        load_model([model], directory)
    except (FileNotFoundError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        # a truncated save surfaces as assorted errors; torch's CheckpointException derives from BaseException
        if not dist_checkpointing.check_is_distributed_checkpoint(directory):
            raise FileNotFoundError(f"{directory}: not a megatron distributed checkpoint") from e
        raise RuntimeError(f"{directory}: incomplete or unreadable checkpoint ({type(e).__name__}: {e})") from e
    if use_ema:
        from latentlm_mcore.training.ema import load_ema_weights
        load_ema_weights([model], directory)
    # one device for the whole model: megatron's layers are built on the current CUDA device when there
    # is one, and the generation loop reads the device off the diffusion head
    model.to(compute_device())
    model.eval()
    return model, cfg, provenance, directory


def missing_shard_files(directory: str) -> list[str]:
    """Shard files that the checkpoint's metadata names but that are absent or shorter than recorded."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(directory).read_metadata()
    except Exception:  # not torch's file layout: leave the judgement to the loader
        return []
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    paths = {f: os.path.join(directory, f) for f in needed}
    return sorted(f for f, size in needed.items() if not os.path.isfile(paths[f]) or os.path.getsize(paths[f]) < size)


def megatron_forward(model):
    """`RecomputeDecoder` forward over the Megatron model: left padding hidden by an explicit mask."""
    @torch.no_grad()
    def forward(ids, latents, latent_mask, attention_mask):
        b, s = ids.shape
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=ids.device), diagonal=1)
        padding = ~attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: padded keys
        mask = causal[None, None] | padding
        mask &= ~torch.eye(s, dtype=torch.bool, device=ids.device)  # a padding query attends to itself
        positions = torch.arange(s, device=ids.device).expand(b, s)
        return model(ids, positions, attention_mask=mask, latents=latents, latent_mask=latent_mask)

    return forward


class MegatronKVDecoder(Decoder):
    """megatron's own KV cache: a `StaticInferenceContext` whose per-layer key/value buffers the
    attention layers fill; each step feeds only the new positions. Padding stays hidden by an
    explicit mask (megatron turns its causal mask type off after the prefill; an explicit mask
    is still applied by the local attention).

    `model` may be a live training model (training/fid_hook.py): wrapped in megatron's Float16Module (bf16
    runs: it casts the inputs) and tensor-parallel, in which case every TP rank of a data-parallel rank runs
    the same steps and the vocab-parallel logits are gathered, so all of them sample the same tokens."""

    def __init__(self, model):
        from megatron.core.utils import unwrap_model

        inner = unwrap_model(model)
        if inner.config.sequence_parallel or not (inner.pre_process and inner.post_process):
            raise ValueError("generation needs the whole model in each tensor-parallel group, without sequence "
                             "parallelism (one new position per step cannot be split over the TP ranks)")
        cfg = inner.model_cfg
        super().__init__(inner.diffusion_head, inner.noise_schedule.alphas_cumprod, cfg.prediction, cfg.latent_dim)
        self.model = model
        self.tensor_parallel = inner.config.tensor_model_parallel_size > 1

    def start(self, max_length: int) -> None:
        self.context, self.max_length = None, max_length

    @torch.no_grad()
    def step(self, input_ids, latents, latent_mask, attention_mask):
        from megatron.core.inference.contexts import StaticInferenceContext

        b, n = input_ids.shape
        if self.context is None:  # buffers of max_length positions per layer, allocated by the layers
            self.context = StaticInferenceContext(b, self.max_length)
        offset, total = self.context.sequence_len_offset, attention_mask.shape[1]
        queries, keys = torch.arange(offset, offset + n)[:, None], torch.arange(total)[None, :]
        mask = (keys > queries)[None, None] | ~attention_mask.bool()[:, None, None, :]
        mask &= ~(keys == queries)  # a padding query attends to itself (no empty rows)
        positions = torch.arange(offset, offset + n).expand(b, n)
        input_ids, positions, mask, latents, latent_mask = (
            x.to(self.device) for x in (input_ids, positions, mask, latents, latent_mask))
        logits, hidden = self.model(input_ids, positions, attention_mask=mask, latents=latents,
                                    latent_mask=latent_mask, inference_context=self.context)
        self.context.sequence_len_offset += n
        logits = logits[:, -1].float()
        if self.tensor_parallel:  # [b, vocab / TP] -> [b, vocab]
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
            logits = gather_from_tensor_model_parallel_region(logits.contiguous())
        return logits.cpu(), hidden[:, -1].float().cpu()


def megatron_decoder(model, use_cache: bool = True) -> Decoder:
    """The Megatron backend: megatron's static KV cache, or recomputing the prefix at every step."""
    if use_cache:
        return MegatronKVDecoder(model)
    return RecomputeDecoder(megatron_forward(model), model.diffusion_head, model.noise_schedule.alphas_cumprod,
                            model.model_cfg.prediction, model.model_cfg.latent_dim)
