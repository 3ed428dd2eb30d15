"""Dataclass configs and named presets.

`ModelConfig` describes the network (backbone, latent projection, diffusion head, diffusion
objective); `TrainConfig` the optimisation schedule; `ParallelConfig` the layout over devices.
`PRESETS` maps a name to a `LatentLMConfig` holding all three. Entry points parse overrides
into these with runtime/cli.py; the library never reads a command line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from latentlm_mcore.runtime.cli import apply_overrides  # noqa: F401  (bench/ and tests import it from here)

# cl100k_base has 100,277 ids (100,256 BPE ranks + specials up to 100,276); padded to 100,288
# (a multiple of 64 and of 8*TP for TP <= 8) with our special tokens in the padding range.
CL100K_PADDED_VOCAB = 100_288
CL100K_8K_PADDED_VOCAB = 8_256  # tokenizer cl100k_base:8192 (cl100k's first 8192 ranks) + 5 specials, padded


@dataclass
class ModelConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    latent_dim: int
    head_layers: int
    num_query_groups: int | None = None  # None = multi-head attention
    head_hidden_size: int | None = None  # None = hidden_size
    head_ffn_hidden_size: int | None = None  # None = 8/3 * head_hidden_size, a SwiGLU of the official code's width
    timestep_embedding_dim: int = 256  # sinusoidal features fed to the head's timestep MLP
    rotary_base: int = 10_000
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    # diffusion objective (paper 2.1 / appendix B)
    prediction: Literal["v", "eps"] = "v"
    num_timesteps: int = 1000
    batch_mul: int = 4  # timesteps sampled per latent per forward pass
    diffusion_loss_weight: float = 1.0  # alpha in L_LM + alpha * L_Diff

    def __post_init__(self):
        if self.head_hidden_size is None:
            self.head_hidden_size = self.hidden_size
        if self.head_ffn_hidden_size is None:
            # the official code rounds 8/3 d down to a multiple of 64 (2688 at d = 1024); the paper's own 8/3 d
            # figure is 2730, which is what Table 1's 479M parameters count
            self.head_ffn_hidden_size = 8 * self.head_hidden_size // 3
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TrainConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 500
    train_steps: int = 250_000
    global_batch_size: int = 1024  # sequences per optimizer step
    micro_batch_size: int = 1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    ema_decay: float = 0.0  # EMA of the weights kept beside them (training/ema.py); 0 = none. imagenet-*: DiT's 0.9999


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    virtual_pipeline_parallel: int | None = None
    distributed_optimizer: bool = True


@dataclass
class RunConfig:
    """Where a pretraining run reads and writes, how often, and with which numerics."""
    data: str | None = None  # tools/preprocess_interleaved.py output; None = random batches (benchmarks)
    eval_data: str | None = None  # held-out preprocessed folder for periodic evaluation
    save: str = "runs/latentlm"  # checkpoints, metrics.jsonl, loss_curve.png, TensorBoard / wandb logs
    load: str | None = None  # start from this checkpoint when `save` has none yet (`save` has priority)
    data_cache: str | None = None  # node-local cache for remote (s3://...) datasets; local paths are read in place
    proportions: str = "text=2,pair=1,interleaved=1"
    mixture_unit: Literal["tokens", "documents"] = "tokens"  # what `proportions` share out
    condition_dropout: float = 0.1  # drop a caption-first pair's caption with this probability (CFG)
    image_first_share: float = 0.5  # share of pairs emitted image -> caption (captioning); the rest caption -> image
    sample_latents: bool = True  # the LM sees σ-VAE samples z = μ + σ·ε drawn in the loader (False: μ)
    num_workers: int = 2  # document-reading processes per rank
    log_interval: int = 10
    save_interval: int = 1000
    eval_interval: int = 1000
    eval_iters: int = 10  # micro-batches per rank per evaluation
    keep_last: int = 3  # checkpoints kept; older ones are deleted once a newer one is complete
    log_sample_ids: bool = False  # <save>/sample_ids.jsonl: the global sequences and documents of every step
    exit_after: int | None = None  # stop (with a checkpoint) after this many steps in this invocation
    lease_wait: float = 0.0  # seconds to wait for another run's lease on `save` before refusing (runtime/lease.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fp8: Literal["e4m3", "hybrid"] | None = None  # Transformer Engine FP8 for the backbone's linear layers
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    recompute: Literal["selective", "full"] | None = None  # activation recomputation
    wandb_project: str | None = None  # wandb logging; offline unless WANDB_MODE / WANDB_API_KEY say otherwise
    tensorboard: bool = True
    peak_tflops: float | None = None  # per device, for MFU; default: looked up from the GPU name
    # periodic FID of class-to-image samples from the live model (training/fid_hook.py); 0 = off
    eval_fid_every: int = 0
    fid_reference: str | None = None  # reference statistics (.npz with mu/sigma: tools/evaluate_images.py's or ADM's)
    fid_num_samples: int = 1000  # images per evaluation, over all data-parallel ranks
    fid_use_ema: bool = False  # sample from the EMA of the weights (train.ema_decay > 0), as DiT evaluates
    fid_inception_weights: str | None = None  # Inception-v3 weights with the classifier, for the Inception Score


@dataclass
class LatentLMConfig:
    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cfg_scale: float | None = None  # classifier-free guidance the paper samples this preset with (None: not given)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.model.seq_length


def _mllm_1p3b() -> LatentLMConfig:
    # Appendix D, Table 8: 4M-token batches (1024 x 4096) for 250k steps = 1T tokens.
    return LatentLMConfig(
        name="mllm-1.3b",
        model=ModelConfig(num_layers=24, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                          vocab_size=CL100K_PADDED_VOCAB, seq_length=4096, latent_dim=32, head_layers=6),
        train=TrainConfig(lr=3e-4, min_lr=3e-5, warmup_steps=500, train_steps=250_000,
                          global_batch_size=1024, micro_batch_size=1, weight_decay=0.1),
        parallel=ParallelConfig(tensor_parallel=1, pipeline_parallel=1),
    )


def _imagenet(name: str, hidden: int, layers: int, heads: int, lr: float) -> LatentLMConfig:
    # Appendix A, Table 7 (LatentLM column): FFN 4d, 3-layer diffusion head, class-conditional 256px images
    # as 16x16 = 256 latents of dim 32 (patch-16 sigma-VAE), 75k steps at batch 2048 = ~120 epochs of
    # ImageNet's 1.28M images, CFG 1.75 (section 3.1.2). The head's FFN is 4d as well: the official code
    # sizes it with the backbone's mlp_ratio (6 * 2/3), and only then do the parameters come to Table 7's
    # 455M / 1.03B / 1.82B / 3.68B (with 8/3 d: 442M / 0.99B / ...).
    # Sequence: class token, <BOD>, 256 latents, <EOD>; vocab = 1000 classes + specials, padded.
    return LatentLMConfig(
        name=name,
        model=ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                          num_attention_heads=heads, vocab_size=1024, seq_length=260, latent_dim=32,
                          head_layers=3, head_ffn_hidden_size=4 * hidden),
        train=TrainConfig(lr=lr, min_lr=lr / 10, warmup_steps=100, train_steps=75_000,
                          global_batch_size=2048, micro_batch_size=32, weight_decay=0.1, ema_decay=0.9999),
        cfg_scale=1.75,
    )


def _imagenet_latentlm_l() -> LatentLMConfig:
    # Section 3.1.1, Table 1 (LatentLM-L, 479M, FID 2.24): 32 layers of width 1024 (16 heads of 64, as the
    # official Transformer_L), FFN 2730 = 8/3 d, 6-layer head of FFN 8/3 d, AdamW (0.9, 0.98), LR 5e-4 with
    # 100 warmup steps, cosine, weight decay 0.1, 250k steps at batch 2048 (~400 epochs), CFG 1.65.
    # FFN 2730 shards over TP <= 2 only (2730 = 2 * 3 * 5 * 7 * 13).
    return LatentLMConfig(
        name="imagenet-latentlm-l",
        model=ModelConfig(num_layers=32, hidden_size=1024, ffn_hidden_size=2730, num_attention_heads=16,
                          vocab_size=1024, seq_length=260, latent_dim=32, head_layers=6),
        train=TrainConfig(lr=5e-4, min_lr=5e-5, warmup_steps=100, train_steps=250_000,
                          global_batch_size=2048, micro_batch_size=32, weight_decay=0.1, ema_decay=0.9999),
        cfg_scale=1.65,
    )


def _tts_24l() -> LatentLMConfig:
    # Section 3.3.1 and appendix E, Table 9: 24 layers x 1024, FFN 4096, 16 heads, 3-layer head, LR 7.5e-4,
    # 5M-token batches (1280 x 4096), 100k steps, 10k warmup, weight decay 0.01. Latents: the 15 Hz audio σ-VAE
    # (latent dim 32, Table 5), the frame rate of Table 4's best row; the 7.5 / 3.75 Hz rows take
    # --model.latent-dim 64 / 128 with those σ-VAEs. CFG 4 (Fig. 10a).
    return LatentLMConfig(
        name="tts-24l",
        model=ModelConfig(num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                          vocab_size=CL100K_PADDED_VOCAB, seq_length=4096, latent_dim=32, head_layers=3),
        train=TrainConfig(lr=7.5e-4, min_lr=7.5e-5, warmup_steps=10_000, train_steps=100_000,
                          global_batch_size=1280, micro_batch_size=1, weight_decay=0.01),
        cfg_scale=4.0,
    )


def _tts_tiny() -> LatentLMConfig:
    # The CPU size of tts-24l (quickstart class) for the spoken digits: the `tiny` audio σ-VAE's 40 Hz latents of
    # dim 16, cl100k_base:8192. Sequence 256: a digits document is a <= 3 s voice prompt (<= 120 latents, ~80 in
    # the corpus), a few text ids and a <= 2 s target (<= 80 latents), so one document fits a sequence.
    return LatentLMConfig(
        name="tts-tiny",
        model=ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                          vocab_size=CL100K_8K_PADDED_VOCAB, seq_length=256, latent_dim=16, head_layers=3,
                          head_ffn_hidden_size=128, batch_mul=4),  # 4 noise levels a latent, not 16: 1,820 -> 3,240 tok/s
        # data-parallel (the default layout), not TP=2: at width 128 the per-layer all-reduces cost 17% (3,240
        # against 3,780 tok/s on 2 processes)
        train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=20, train_steps=1000, global_batch_size=8,
                          micro_batch_size=4, weight_decay=0.01),
        cfg_scale=4.0,
    )


def _tiny() -> LatentLMConfig:
    # Runs in seconds on a CPU; vocab padded cl100k so the real tokenizer works with it.
    return LatentLMConfig(
        name="tiny",
        model=ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          vocab_size=CL100K_PADDED_VOCAB, seq_length=128, latent_dim=16, head_layers=2),
        train=TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, train_steps=200, global_batch_size=8,
                          micro_batch_size=2, weight_decay=0.01),
    )


def _quickstart() -> LatentLMConfig:
    # scripts/quickstart.sh: the demo corpus (sklearn digits at 16px as 4 latents of dim 16 from the `quickstart`
    # sigma-VAE, stdlib docstrings) on 2 CPU processes with TP=2 in about ten minutes. Tokenizer cl100k_base:8192:
    # at this width a 100k-row output layer is most of the step (1.51 s vs 0.26 s per micro-batch, bench/
    # model_overhead.py), and the 4x more steps are what make the digits come out right: at 300 steps 35% of
    # generated digits are the one asked for, at 1000 steps 100% (CFG 3).
    # diffusion_loss_weight 5: with 1, 300 steps learn a caption-independent stroke prior (the diffusion loss is
    # the same under the right and a wrong caption) and 8% of generated digits are the one asked for; with 5, 38%,
    # at the same held-out LM loss. head_ffn_hidden_size 128 (its width, not the 8/3 default): the head those
    # digits were measured with.
    return LatentLMConfig(
        name="quickstart",
        model=ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                          vocab_size=CL100K_8K_PADDED_VOCAB, seq_length=256, latent_dim=16, head_layers=3,
                          head_ffn_hidden_size=128,
                          batch_mul=16, diffusion_loss_weight=5.0),  # the head is cheap next to the output layer: more noise levels per latent
        train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=20, train_steps=1000, global_batch_size=8,
                          micro_batch_size=4, weight_decay=0.01),
        parallel=ParallelConfig(tensor_parallel=2),
        cfg_scale=3.0,  # scripts/quickstart.sh samples the digits with it
    )


def _classcond_digits() -> LatentLMConfig:
    # scripts/classcond_demo.sh: class-conditional LatentLM (paper section 3.1) on scikit-learn's digits, the
    # ImageNet recipe at the quickstart's size: 16px digits as 4 latents of dim 16 from the `quickstart` σ-VAE,
    # vocabulary classes:10 (10 classes, <NULL_CLASS>, 5 specials, padded to 64), one image per sequence:
    # <class> <BOD> 4 latents <EOD> <END_OF_DOCUMENT> = 8 ids. Label dropout 0.1 (the loader's default) and an
    # EMA of the weights, with a decay for a 1000-step run (DiT's 0.9999 averages over ~10k steps).
    return LatentLMConfig(
        name="classcond-digits",
        model=ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                          vocab_size=64, seq_length=8, latent_dim=16, head_layers=3, head_ffn_hidden_size=128,
                          batch_mul=16, diffusion_loss_weight=5.0),  # the quickstart's weight (its comment): class-blind strokes otherwise
        # ema_decay 0.99, not 0.995: an EMA of ~100 steps. At 0.995 the 300-step run still weighed the initial
        # weights by 0.995^300 = 22%.
        train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup_steps=20, train_steps=1000, global_batch_size=64,
                          micro_batch_size=32, weight_decay=0.01, ema_decay=0.99),
        parallel=ParallelConfig(tensor_parallel=2),
        cfg_scale=3.0,
    )


PRESETS = {
    "tiny": _tiny,
    "quickstart": _quickstart,
    "classcond-digits": _classcond_digits,
    "mllm-1.3b": _mllm_1p3b,
    "imagenet-m": lambda: _imagenet("imagenet-m", 1024, 24, 16, 8e-4),
    "imagenet-l": lambda: _imagenet("imagenet-l", 1536, 24, 12, 3e-4),
    "imagenet-xl": lambda: _imagenet("imagenet-xl", 2048, 24, 16, 2e-4),
    "imagenet-3b": lambda: _imagenet("imagenet-3b", 2560, 32, 20, 1.6e-4),
    "imagenet-latentlm-l": _imagenet_latentlm_l,
    "tts-24l": _tts_24l,
    "tts-tiny": _tts_tiny,
}


def get_preset(name: str) -> LatentLMConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def count_parameters(model: ModelConfig) -> dict[str, int]:
    """Parameter count by part, from the architecture alone (no weights allocated).

    Mirrors exactly what `LatentLMModel` builds: bias-free backbone with pre-RMSNorm, SwiGLU, GQA-able
    attention, final norm, (un)tied output layer, latent input projection, and the diffusion head.
    """
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    kv = (model.num_query_groups or model.num_attention_heads) * model.kv_channels
    attention = h * (h + 2 * kv) + h * h  # fused QKV + output projection
    mlp = 2 * h * f + f * h  # gate+up, down
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    embedding = model.vocab_size * h
    output = 0 if model.tie_embeddings else model.vocab_size * h
    latent_in = model.latent_dim * h
    hh, hf, d, te = model.head_hidden_size, model.head_ffn_hidden_size, model.latent_dim, model.timestep_embedding_dim
    head = (
        h + h * hh  # condition: RMSNorm(h) weight, Linear(h -> hh)
        + (te * hh + hh) + (hh * hh + hh)  # timestep MLP (with biases)
        + d * hh  # noisy latent input projection
        + model.head_layers * (hh + (hh * 3 * hh + 3 * hh) + 3 * hh * hf)  # norm, AdaLN(shift,scale,gate), SwiGLU
        + (hh * 2 * hh + 2 * hh) + hh * d  # final AdaLN (shift, scale) + output projection
    )
    parts = {
        "embedding": embedding,
        "transformer": L * layer + h,  # + final norm
        "output_layer": output,
        "latent_projection": latent_in,
        "diffusion_head": head,
    }
    parts["total"] = sum(parts.values())
    return parts
