"""LatentLMModel: one causal Transformer over interleaved text tokens and latent vectors.

Input: token ids go through the vocab-parallel embedding; positions that hold a latent take
`latent_projection(latent)` instead. Output at position i predicts position i+1: a discrete next
token -> vocab-parallel cross-entropy on the (untied) vocab-parallel output layer; a latent next
token -> diffusion loss of the `DiffusionHead` conditioned on h_i.

The head is data-parallel only. It is replicated on every tensor-parallel rank of the last pipeline
stage; each TP rank runs it on its own contiguous 1/TP share of the sequence (exactly its
sequence-parallel shard when SP is on; without SP the full hidden states are split with
`scatter_to_sequence_parallel_region`, whose backward all-gathers the per-share gradients). The
head's weight gradients are therefore partial per TP rank and are summed over the TP group by
`finalize_latentlm_grads`, on top of megatron's data-parallel reduction.

Diffusion noise and timesteps are drawn per sample from a generator seeded by the batch's
`noise_seed`, over the whole sequence, then sliced: every layout (TP, SP, PP, DP) and every resume
sees identical noise. The seeds and the diffusion mask stay on the host (the trainer does not move
them), so the last stage never reads a value back from the device: the rows of the latent targets are
indices computed on the host, gathered with `index_select`.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from latentlm_mcore.config import ModelConfig
from latentlm_mcore.diffusion import NoiseSchedule, diffusion_loss
from latentlm_mcore.model.diffusion_head import DiffusionHead


def init_device(config: TransformerConfig) -> torch.device:
    """Where megatron's layers allocate their weights under `config`: the CPU with
    `use_cpu_initialization`, else the current CUDA device. The parameters outside megatron layers
    (latent projection, diffusion head) are created there too, so the TP broadcast of them runs on the
    device of the group's backend and the whole model sits on one device from the start. A build under
    `torch.device("meta")` (the memory planner, `training/memory.py`) stays on meta."""
    if torch.get_default_device().type == "meta":
        return torch.device("meta")
    if config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class LatentLMModel(LanguageModule):
    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig, block_spec: TransformerBlockSubmodules,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.vocab_size = model_cfg.vocab_size
        self.max_sequence_length = model_cfg.seq_length
        self.share_embeddings_and_output_weights = model_cfg.tie_embeddings
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules expect
        # the local attention needs an explicit causal mask (its default one is built on "cuda")
        core_attention = block_spec.layer_specs[0].submodules.self_attention.submodules.core_attention
        self.needs_explicit_causal_mask = core_attention is DotProductAttention

        if pre_process:
            # scatter to SP shards ourselves, after latent positions are filled in
            self.embedding = LanguageModelEmbedding(config, model_cfg.vocab_size, model_cfg.seq_length,
                                                    position_embedding_type="rope", scatter_to_sequence_parallel=False)
            self.latent_projection = torch.nn.Linear(model_cfg.latent_dim, config.hidden_size, bias=False,
                                                     dtype=config.params_dtype)
            torch.nn.init.normal_(self.latent_projection.weight, std=model_cfg.init_std)
            # drawn on the CPU (the same values on every kind of machine), then moved
            self.latent_projection.to(init_device(config))
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=model_cfg.rotary_base,
                                              use_cpu_initialization=config.use_cpu_initialization)
        self.decoder = TransformerBlock(config=config, spec=block_spec, pre_process=pre_process,
                                        post_process=post_process, vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, model_cfg.vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights)
            self.diffusion_head = DiffusionHead.from_config(model_cfg).to(init_device(config), config.params_dtype)
            self.noise_schedule = NoiseSchedule(model_cfg.num_timesteps, model_cfg.prediction)
        self.setup_embeddings_and_output_layer()
        self._broadcast_replicated_params_over_tp()

    def replicated_params(self):
        """Parameters that are full copies on every TP rank and live outside megatron layers."""
        modules = []
        if self.pre_process:
            modules.append(self.latent_projection)
        if self.post_process:
            modules.append(self.diffusion_head)
        return [p for m in modules for p in m.parameters()]

    @torch.no_grad()
    def _broadcast_replicated_params_over_tp(self):
        # torch initialises these from the default generator; make the TP copies identical by
        # construction rather than by trusting every rank consumed that generator identically.
        # They live where megatron put its own weights (`init_device`): on a GPU run that is the
        # current CUDA device, the only kind of tensor an NCCL group broadcasts.
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return
        group = parallel_state.get_tensor_model_parallel_group()
        src = torch.distributed.get_global_rank(group, 0)
        for p in self.replicated_params():
            torch.distributed.broadcast(p.data, src=src, group=group)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "LatentLMModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # ---------------------------------------------------------------- input
    def embed(self, input_ids: Tensor, position_ids: Tensor, latents: Optional[Tensor],
              latent_mask: Optional[Tensor]) -> Tensor:
        """Token embeddings with latent positions replaced by the projected latents -> [s, b, h]
        (the local SP shard when sequence parallelism is on)."""
        emb = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        if latents is not None and latent_mask is not None:
            projected = self.latent_projection(latents.to(self.latent_projection.weight.dtype))
            mask = latent_mask.transpose(0, 1).unsqueeze(-1)
            # contiguous: where() would keep the transposed strides, and so would every layer after it
            emb = torch.where(mask, projected.transpose(0, 1).to(emb.dtype), emb).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor] = None,
                latents: Optional[Tensor] = None, latent_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, diffusion_targets: Optional[Tensor] = None,
                diffusion_mask: Optional[Tensor] = None, noise_seed: Optional[Tensor] = None,
                decoder_input: Optional[Tensor] = None, inference_context=None):
        """All tensors batch-first [b, s, ...] as the loader emits them.

        Returns on the last pipeline stage, when `labels` is given, a tuple
        (lm_loss_per_token [b, s], diffusion_loss_per_latent_target [n_local]); the caller masks, sums
        and normalises them over the global batch (see `latentlm_loss`). Without labels: (logits [b, s, vocab/TP],
        hidden [b, s, h]). On other stages: the hidden states for the next stage.

        `inference_context` (a megatron `StaticInferenceContext`; generation only): the layers keep
        keys/values in it and the input holds only the new positions, which continue at
        `inference_context.sequence_len_offset` (advanced by the caller).
        """
        seq_len = position_ids.shape[1]
        if decoder_input is None and self.pre_process:
            decoder_input = self.embed(input_ids, position_ids, latents, latent_mask)
        if attention_mask is None and self.needs_explicit_causal_mask:
            attention_mask = torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool,
                                                   device=position_ids.device), diagonal=1)
        # with a KV cache the layers slice the rotary table at the cached offset: build it whole
        rotary_len = seq_len if inference_context is None else inference_context.max_sequence_length
        rotary_pos_emb = self.rotary_pos_emb(rotary_len)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                              rotary_pos_emb=rotary_pos_emb, inference_context=inference_context)
        if not self.post_process:
            return hidden

        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=output_weight)
        if labels is None:
            if self.config.sequence_parallel:
                hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            return logits.transpose(0, 1).contiguous(), hidden.transpose(0, 1).contiguous()
        lm_loss = self.compute_language_model_loss(labels, logits)
        return lm_loss, self.diffusion_losses(hidden, diffusion_targets, diffusion_mask, noise_seed)

    def diffusion_losses(self, hidden: Tensor, targets: Optional[Tensor], mask: Optional[Tensor],
                         noise_seed: Optional[Tensor]) -> Tensor:
        """Diffusion loss of every latent target in this TP rank's share of the positions.

        hidden [s or s/TP, b, h] on the device; targets [b, s, D] on the device; mask [b, s] (1 where
        the next token is a latent) and noise_seed [b], both best left on the host: which rows the head
        sees and how the noise is seeded are then known without reading anything back from the device
        (a device mask or seed works too, at the cost of a sync). Returns the per-latent losses [n_local],
        each averaged over its batch_mul timesteps (one zero-weighted dummy row when n_local == 0, so
        every rank's head takes part in the backward).
        """
        b = hidden.shape[1]
        seq_len = hidden.shape[0] * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        if targets is None:
            targets = hidden.new_zeros(b, seq_len, self.model_cfg.latent_dim)
        if not self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        tp, rank = self.config.tensor_model_parallel_size, parallel_state.get_tensor_model_parallel_rank()
        share = slice(rank * seq_len // tp, (rank + 1) * seq_len // tp)
        rows = self._latent_target_rows(mask, b, share)
        empty = rows.numel() == 0
        if empty:
            rows = torch.zeros(1, dtype=torch.int64)
        if hidden.device.type == "cuda":
            rows = rows.pin_memory()  # a copy from pageable memory may wait for the stream
        rows = rows.to(hidden.device, non_blocking=True)
        timesteps, noise = self._sample_noise(noise_seed, b, seq_len, hidden.device)

        def gather(x):  # [b, s, ...] -> the target rows of this rank's share, [n_local, ...]
            local = x.transpose(0, 1)[share]
            return local.reshape(-1, *local.shape[2:]).index_select(0, rows)

        condition = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        losses = diffusion_loss(self.diffusion_head, self.noise_schedule, condition, gather(targets).to(hidden.dtype),
                                gather(timesteps), gather(noise).to(hidden.dtype))
        return losses * 0.0 if empty else losses

    @staticmethod
    def _latent_target_rows(mask: Optional[Tensor], b: int, share: slice) -> Tensor:
        """Host int64 indices of the latent targets in the share flattened as [s/TP * b] (position-major,
        the layout of the hidden states): (position - share.start) * b + sample."""
        if mask is None:
            return torch.zeros(0, dtype=torch.int64)
        positions, samples = (mask.detach().cpu()[:, share] > 0).t().nonzero(as_tuple=True)
        return positions * b + samples

    def _sample_noise(self, noise_seed: Optional[Tensor], b: int, seq_len: int, device):
        """Timesteps [b, s, k] and noise [b, s, k, D] for every position, drawn per sample on `device` from a
        generator seeded by its noise_seed (read on the host), then sliced by the caller: every layout
        (TP, SP, PP, DP) and every resume sees the same noise on the same kind of device."""
        k, d, T = self.model_cfg.batch_mul, self.model_cfg.latent_dim, self.model_cfg.num_timesteps
        if noise_seed is None:
            raise ValueError("noise_seed is required to train the diffusion head: one int per sample, "
                             "so that every parallel layout and every resume draws the same noise")
        seeds = noise_seed.detach().cpu().reshape(-1).tolist()
        if len(seeds) != b:
            raise ValueError(f"noise_seed has {len(seeds)} entries for a micro-batch of {b} sequences")
        timesteps, noise = [], []
        for seed in seeds:
            g = torch.Generator(device=device).manual_seed(int(seed))
            timesteps.append(torch.randint(0, T, (seq_len, k), generator=g, device=device))
            noise.append(torch.randn(seq_len, k, d, generator=g, device=device))
        return torch.stack(timesteps), torch.stack(noise)
