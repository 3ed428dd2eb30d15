"""Start the σ-VAE encoder from pretrained ViT weights (paper §3.1.3 initialises it from BEiT-3 base).

The checkpoint is read weights-only (safetensors, or `torch.load(weights_only=True)`); its layout is told by
its key names, under any prefix (`vit.`, `beit3.`, `module.`, ...) and inside a `model` / `state_dict` /
`module` wrapper:

  timm     timm's VisionTransformer: patch_embed.proj, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
           mlp.fc1, mlp.fc2, ls1.gamma, ls2.gamma}, norm
  beit     BEiT / BEiT v2 (unilm, timm's beit.py): timm's names, but qkv without bias plus attn.q_bias and
           attn.v_bias (k has none), layer scale gamma_1 / gamma_2, relative position bias tables
  hf       transformers ViTModel / ViTFor* (and BeitModel): embeddings.{patch_embeddings.projection,
           position_embeddings}, encoder.layer.N.{layernorm_before, attention.attention.query/key/value,
           attention.output.dense, layernorm_after, intermediate.dense, output.dense, lambda_1, lambda_2}, layernorm
  beit3    BEiT-3 (torchscale): vision_embed.proj, encoder.embed_positions, encoder.layers.N.{self_attn_layer_norm,
           self_attn.q/k/v/out_proj, final_layer_norm, ffn.fc1, ffn.fc2}, encoder.layer_norm; multiway modules
           take their vision expert (`.A`)

What maps: patch embedding, absolute position embeddings, every block's norms, attention and MLP, the final norm.
Layer scale γ is folded into the projection before it (γ·(Wx + b) = (γW)x + γb), q/v-only biases become a qkv
bias with k's zero. The latent projection `to_latent` always starts fresh. What has no counterpart here is
reported, not loaded: class / mask tokens, heads, BEiT's relative position bias (the encoder then keeps its own
initial absolute position embedding) and BEiT-3's sub-LayerNorms (`inner_attn_ln`, `ffn_layernorm`) and text
expert (`.B`); such a start has the checkpoint's weights but not exactly its function.

Position embeddings: the class-token row (and BEiT-3's two fairseq padding rows) are dropped; when the
checkpoint's patch grid differs from the encoder's (ViT-B/16 at 224 px is 14×14, the paper preset at 256 px is
16×16) the grid is resized as an image, bicubic with align_corners=False (what timm does for ViTs).
Shape mismatches (hidden size, MLP width, patch size, channels) are all named per key in one error.
"""

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# key suffix that marks each layout -> layout name (the prefix before it is where the encoder lives)
_SIGNATURES = {
    "embeddings.patch_embeddings.projection.weight": "hf",
    "vision_embed.proj.weight": "beit3",
    "patch_embed.proj.weight": "timm",
}
_WRAPPERS = ("model", "state_dict", "module")


@dataclass
class EncoderInit:
    """What `load_pretrained_encoder` did: encoder parameter names loaded / left as initialised, checkpoint
    keys not used, and notes (position-embedding resizing, biases that were absent)."""
    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"encoder initialised from {self.path} ({self.layout} layout): {len(self.loaded)} tensors loaded"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.kept:
            lines.append(f"  kept as initialised ({len(self.kept)}): {', '.join(self.kept)}")
        if self.unused:
            more = len(self.unused) - 12
            shown = ", ".join(self.unused[:12]) + (f", ... ({more} more)" if more > 0 else "")
            lines.append(f"  not used from the checkpoint ({len(self.unused)}): {shown}")
        return "\n".join(lines)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, weights-only, unwrapped from `model` / `state_dict` / `module`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"encoder checkpoint {path} is not readable weights-only (safetensors, or a torch file "
                         f"of tensors): {e}") from e
    while isinstance(state, dict):
        inner = [k for k in _WRAPPERS if isinstance(state.get(k), dict)]
        if not inner:
            break
        state = state[inner[0]]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"encoder checkpoint {path} holds no state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_layout(state: dict, path: str = "checkpoint") -> tuple[str, str]:
    """(layout, prefix) from the key names; exactly one encoder must be in the file."""
    found = [(layout, key[:-len(sig)]) for key in state for sig, layout in _SIGNATURES.items()
             if key.endswith(sig) and (not key[:-len(sig)] or key[:-len(sig)].endswith("."))]
    if not found:
        raise ValueError(f"{path}: no ViT layout recognised (timm, BEiT, HF ViT, BEiT-3); none of its keys ends "
                         f"in {sorted(_SIGNATURES)}; first keys: {sorted(state)[:6]}")
    if len(found) > 1:
        raise ValueError(f"{path}: holds {len(found)} encoders ({', '.join(p or '<root>' for _, p in found)}); "
                         "save the one to start from on its own")
    layout, prefix = found[0]
    if layout == "timm" and any(k.startswith(prefix) and k.endswith(("attn.q_bias", "gamma_1",
                                                                     "relative_position_bias_table"))
                                for k in state):
        layout = "beit"
    return layout, prefix


class _Source:
    """Checkpoint keys under one prefix, recording which ones were taken."""

    def __init__(self, state: dict, prefix: str):
        self.tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.outside = sorted(k for k in state if not k.startswith(prefix))
        self.taken: set[str] = set()

    def get(self, *names: str):
        """The first of `names` present (taken), else None."""
        for name in names:
            if name in self.tensors:
                self.taken.add(name)
                return self.tensors[name]
        return None

    def blocks(self, pattern: str) -> int:
        """Number of blocks: 1 + the largest N in keys starting with pattern.format(N)."""
        head, _, _ = pattern.partition("{}")
        indices = {int(k[len(head):].split(".")[0]) for k in self.tensors
                   if k.startswith(head) and k[len(head):].split(".")[0].isdigit()}
        return max(indices) + 1 if indices else 0


def _qkv(q, k, v):
    """Concatenate q/k/v pieces; an absent piece (BEiT has no k bias) is zeros, all absent is None."""
    present = [t for t in (q, k, v) if t is not None]
    if not present:
        return None
    return torch.cat([t if t is not None else torch.zeros_like(present[0]) for t in (q, k, v)])


def _scaled(weight, bias, gamma):
    """Fold layer scale γ into the linear layer before it."""
    if gamma is None:
        return weight, bias
    return weight * gamma[:, None], None if bias is None else bias * gamma


def _param(src: _Source, module: str, leaf: str):
    """`<module>.<leaf>`, or for a BEiT-3 multiway module its vision expert's `<module>.A.<leaf>`."""
    return src.get(f"{module}.{leaf}", f"{module}.A.{leaf}")


def _map_block(src: _Source, layout: str, i: int) -> dict:
    """Our block i's parameters -> (tensor or None, the checkpoint names it comes from)."""
    if layout in ("timm", "beit"):
        p = f"blocks.{i}."
        norm1, norm2, proj, fc1, fc2 = (p + m for m in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"))
        qkv_w, qkv_b = src.get(p + "attn.qkv.weight"), src.get(p + "attn.qkv.bias")
        qkv_names = p + "attn.qkv"
        if qkv_b is None:  # BEiT: separate q and v biases, none for k
            qkv_b = _qkv(src.get(p + "attn.q_bias"), None, src.get(p + "attn.v_bias"))
        gamma1, gamma2 = src.get(p + "ls1.gamma", p + "gamma_1"), src.get(p + "ls2.gamma", p + "gamma_2")
    elif layout == "hf":
        p = f"encoder.layer.{i}."
        norm1, norm2, proj, fc1, fc2 = (p + m for m in ("layernorm_before", "layernorm_after", "attention.output.dense",
                                                        "intermediate.dense", "output.dense"))
        qkv_names = p + "attention.attention.{query,key,value}"
        qkv_w, qkv_b = (_qkv(*(src.get(f"{p}attention.attention.{x}.{leaf}") for x in ("query", "key", "value")))
                        for leaf in ("weight", "bias"))
        gamma1, gamma2 = src.get(p + "lambda_1"), src.get(p + "lambda_2")
    else:  # beit3
        p = f"encoder.layers.{i}."
        norm1, norm2, proj, fc1, fc2 = (p + m for m in ("self_attn_layer_norm", "final_layer_norm",
                                                        "self_attn.out_proj", "ffn.fc1", "ffn.fc2"))
        qkv_names = p + "self_attn.{q,k,v}_proj"
        qkv_w, qkv_b = (_qkv(*(_param(src, f"{p}self_attn.{x}_proj", leaf) for x in "qkv"))
                        for leaf in ("weight", "bias"))
        gamma1 = gamma2 = None
    proj_w, proj_b = _scaled(_param(src, proj, "weight"), _param(src, proj, "bias"), gamma1)
    fc2_w, fc2_b = _scaled(_param(src, fc2, "weight"), _param(src, fc2, "bias"), gamma2)
    ours = f"blocks.{i}."
    out = {ours + "attn.qkv.weight": (qkv_w, qkv_names), ours + "attn.qkv.bias": (qkv_b, qkv_names),
           ours + "attn.proj.weight": (proj_w, proj), ours + "attn.proj.bias": (proj_b, proj),
           ours + "mlp.2.weight": (fc2_w, fc2), ours + "mlp.2.bias": (fc2_b, fc2)}
    for mine, theirs in (("norm1", norm1), ("norm2", norm2), ("mlp.0", fc1)):
        for leaf in ("weight", "bias"):
            out[f"{ours}{mine}.{leaf}"] = (_param(src, theirs, leaf), theirs)
    return out


def resize_pos_embed(grid: torch.Tensor, size: int) -> torch.Tensor:
    """[g·g, D] position embeddings in row-major patch order -> [size·size, D]: the D-channel g×g image resized
    bicubically (align_corners=False), in float32."""
    g = math.isqrt(grid.shape[0])
    image = grid.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(size * size, -1).to(grid.dtype)


def _patch_rows(pos: torch.Tensor, leading: int | None, path: str) -> torch.Tensor:
    """The patch rows [g·g, D] of a position table [1?, rows, D] after its `leading` non-patch rows; None
    (timm, BEiT): one class-token row when the table is one longer than a square, else none."""
    rows = pos.reshape(-1, pos.shape[-1])
    if leading is None:
        leading = 0 if math.isqrt(rows.shape[0]) ** 2 == rows.shape[0] else 1
    rows = rows[leading:]
    if math.isqrt(rows.shape[0]) ** 2 != rows.shape[0]:
        raise ValueError(f"{path}: position embedding has {rows.shape[0]} patch rows after {leading} leading ones, "
                         "not a square grid")
    return rows


def load_pretrained_encoder(encoder, path: str) -> EncoderInit:
    """Copy a pretrained ViT's weights into `encoder` (a `ViTEncoder`) in place; returns what was done."""
    path = os.fspath(path)
    state = read_state_dict(path)
    layout, prefix = detect_layout(state, path)
    src = _Source(state, prefix)
    report = EncoderInit(path=path, layout=layout)

    pattern = {"timm": "blocks.{}.", "beit": "blocks.{}.", "hf": "encoder.layer.{}.", "beit3": "encoder.layers.{}."}
    n_blocks = src.blocks(pattern[layout])
    if n_blocks != len(encoder.blocks):
        raise ValueError(f"{path}: the checkpoint has {n_blocks} transformer blocks, the encoder "
                         f"{len(encoder.blocks)} (SigmaVAEConfig.enc_layers); they must be equal")
    mapped = {}
    for i in range(n_blocks):
        mapped.update(_map_block(src, layout, i))
    # patch embedding conv and final norm modules; position table and its non-patch leading rows
    if layout in ("timm", "beit"):
        patch, final, pos_name, leading = "patch_embed.proj", "norm", "pos_embed", None
    elif layout == "hf":
        patch, final, pos_name, leading = "embeddings.patch_embeddings.projection", "layernorm", \
            "embeddings.position_embeddings", 1
    else:  # fairseq's positions start at 2, then comes the class token
        patch, final, pos_name = "vision_embed.proj", "encoder.layer_norm", "encoder.embed_positions.weight"
        leading = 2 + ("vision_embed.cls_token" in src.tensors)
    for mine, theirs in (("patch_embed", patch), ("norm", final)):
        for leaf in ("weight", "bias"):
            mapped[f"{mine}.{leaf}"] = (_param(src, theirs, leaf), theirs)
    pos = src.get(pos_name, pos_name.replace(".weight", ".A.weight"))
    if pos is not None:
        rows = _patch_rows(pos, leading, path)
        grid, ours = math.isqrt(rows.shape[0]), math.isqrt(encoder.pos_embed.shape[1])
        if grid != ours and rows.shape[-1] == encoder.pos_embed.shape[-1]:
            rows = resize_pos_embed(rows, ours)
            report.notes.append(f"position embeddings resized from a {grid}x{grid} to a {ours}x{ours} grid (bicubic)")
        mapped["pos_embed"] = (rows[None], pos_name)

    own = dict(encoder.named_parameters())
    mapped = {name: pair for name, pair in mapped.items() if pair[0] is not None}
    mismatched = [f"{name} <- {theirs}: checkpoint {tuple(t.shape)} vs encoder {tuple(own[name].shape)}"
                  for name, (t, theirs) in mapped.items() if tuple(t.shape) != tuple(own[name].shape)]
    if mismatched:
        raise ValueError(f"{path} ({layout} layout) does not fit the encoder; shape mismatches:\n  "
                         + "\n  ".join(mismatched))
    with torch.no_grad():
        for name, (t, _) in mapped.items():
            own[name].copy_(t.to(own[name].dtype))
    report.loaded = sorted(mapped)
    report.kept = sorted(set(own) - set(mapped))
    report.unused = sorted(set(src.tensors) - src.taken) + src.outside
    log.info("%s", report.summary())
    return report
