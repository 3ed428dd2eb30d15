"""The σ-VAE optimizer's parameter groups (layer-wise LR decay on the encoder); the LR schedule is runtime/schedule.py."""

from latentlm_mcore.vae.model import SigmaVAE


def encoder_param_groups(vae: SigmaVAE, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: layer-wise LR decay on the encoder (BEiT-style: patch embedding is layer 0, block i is
    layer i + 1, the final norm and latent projection are the top and keep the full LR); the decoder keeps the
    full LR. Biases, norms and position embeddings get no weight decay. The decay is meant for an encoder that
    starts from pretrained weights (the trainer passes 1.0 otherwise): 0.65 over 12 blocks leaves the bottom
    block 0.6% of the LR and the patch embedding 0.04%, which would all but freeze random ones."""
    top = len(vae.encoder.blocks) + 1

    def layer_of(name: str) -> int:
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
            return 0
        return top

    groups: dict[tuple, dict] = {}
    for name, param in vae.named_parameters():
        decay = 0.0 if param.dim() < 2 or name.endswith("pos_embed") else weight_decay
        scale = layer_decay ** (top - layer_of(name)) if name.startswith("encoder.") else 1.0
        group = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "weight_decay": decay,
                                                   "lr": lr * scale})
        group["params"].append(param)
    return list(groups.values())
