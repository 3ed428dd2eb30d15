from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE
from latentlm_mcore.vae.optim import encoder_param_groups


def test_layerwise_lr_decay_on_encoder_only():
    vae = SigmaVAE(SIGMA_VAE_PRESETS["tiny"])  # 2 encoder blocks: layers 0 (embedding), 1, 2, top 3
    groups = encoder_param_groups(vae, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(vae.named_parameters())
    assert scale_of[id(named["encoder.patch_embed.weight"])] == 0.5 ** 3
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5 ** 2
    assert scale_of[id(named["encoder.blocks.1.mlp.0.weight"])] == 0.5
    assert scale_of[id(named["encoder.to_latent.weight"])] == 1.0
    assert scale_of[id(named["decoder.blocks.0.attn.qkv.weight"])] == 1.0
    assert decay_of[id(named["encoder.blocks.0.norm1.weight"])] == 0.0
    assert decay_of[id(named["decoder.pos_embed"])] == 0.0
    assert decay_of[id(named["decoder.to_pixels.weight"])] == 0.1
    assert len({id(p) for g in groups for p in g["params"]}) == len(named)
