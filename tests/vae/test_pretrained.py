"""Starting the encoder from pretrained ViT checkpoints. Each layout is a small randomly made checkpoint with the
real key names: transformers' ViTModel / BeitModel saved as they are, and timm, BEiT v2 (unilm) and BEiT-3
(torchscale) state dicts whose names these tests write from those projects' public module layouts. Where a
library implements the layout (transformers), the loaded encoder is checked layer by layer against it."""

import pytest
import torch
from safetensors.torch import save_file

import latentlm_mcore.hf  # noqa: F401  (makes transformers importable beside a CPU torch's torchvision)
from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE
from latentlm_mcore.vae.pretrained import load_pretrained_encoder, resize_pos_embed
from transformers import BeitConfig, BeitModel, ViTConfig, ViTModel

TINY = SIGMA_VAE_PRESETS["tiny"]  # 32 px, patch 8 (a 4x4 grid), hidden 64, 4 heads, 2 blocks, MLP 256


def _hf_config(cls, **changes):
    # layer_norm_eps as ours (nn.LayerNorm's 1e-5), so that outputs can be compared exactly
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32,
                  patch_size=8, layer_norm_eps=1e-5)
    fields.update(changes)
    return cls(**fields)


def hf_vit(**changes) -> ViTModel:
    torch.manual_seed(1)
    return ViTModel(_hf_config(ViTConfig, **changes), add_pooling_layer=False).eval()


def hf_beit() -> BeitModel:
    """BEiT with absolute positions, layer scale (made non-trivial) and no relative position bias."""
    torch.manual_seed(2)
    model = BeitModel(_hf_config(BeitConfig, use_absolute_position_embeddings=True, use_relative_position_bias=False,
                                 use_shared_relative_position_bias=False, layer_scale_init_value=0.1,
                                 use_mean_pooling=False), add_pooling_layer=False).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.lambda_1.uniform_(0.2, 2.0)
            layer.lambda_2.uniform_(0.2, 2.0)
    return model


def fresh_encoder():
    torch.manual_seed(3)
    return SigmaVAE(TINY).encoder


def assert_matches_transformers(encoder, hf_model):
    """Patch embedding, every block (on the patch tokens) and the final norm agree with transformers' modules."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = encoder.patch_embed(x).flatten(2).transpose(1, 2)
        theirs = hf_model.embeddings.patch_embeddings(x)
        torch.testing.assert_close(ours, theirs[0] if isinstance(theirs, tuple) else theirs)  # BEiT's is (x, hw)
        torch.testing.assert_close(encoder.pos_embed, hf_model.embeddings.position_embeddings[:, 1:])
        h = ours + encoder.pos_embed
        for block, layer in zip(encoder.blocks, hf_model.encoder.layer, strict=True):
            theirs = layer(h)
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            h = block(h)
            torch.testing.assert_close(h, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoder.norm(h), hf_model.layernorm(h))


def test_hf_vit_layout_matches_transformers_layer_by_layer(tmp_path):
    model = hf_vit()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    encoder = fresh_encoder()
    latent_before = encoder.to_latent.weight.detach().clone()
    report = load_pretrained_encoder(encoder, path)
    assert report.layout == "hf"
    assert_matches_transformers(encoder, model)
    assert report.kept == ["to_latent.bias", "to_latent.weight"]  # the latent projection always starts fresh
    assert torch.equal(encoder.to_latent.weight, latent_before)
    assert report.unused == ["embeddings.cls_token"]


def test_hf_vit_under_a_prefix_in_a_torch_file(tmp_path):
    """ViTForImageClassification-style names (`vit.` prefix, a classifier) inside a {"model": ...} wrapper."""
    model = hf_vit()
    state = {f"vit.{k}": v for k, v in model.state_dict().items()}
    state["classifier.weight"] = torch.zeros(10, 64)
    path = tmp_path / "vit.pth"
    torch.save({"model": state, "epoch": 3}, path)
    encoder = fresh_encoder()
    report = load_pretrained_encoder(encoder, path)
    assert_matches_transformers(encoder, model)
    assert set(report.unused) == {"embeddings.cls_token", "classifier.weight"}


def beit_v2_layout(model: BeitModel) -> dict:
    """transformers' BEiT -> the unilm BEiT v2 / timm beit.py layout: fused qkv weight without bias, q_bias and
    v_bias, gamma_1 / gamma_2, plus the class token, a relative position table and a head as real files have."""
    sd, out = model.state_dict(), {}
    out["cls_token"] = sd["embeddings.cls_token"]
    out["pos_embed"] = sd["embeddings.position_embeddings"]
    out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    for i in range(2):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.attention."
        for ours, theirs in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            for leaf in ("weight", "bias"):
                out[f"{b}{ours}.{leaf}"] = sd[f"{h}{theirs}.{leaf}"]
        out[b + "attn.qkv.weight"] = torch.cat([sd[a + "query.weight"], sd[a + "key.weight"], sd[a + "value.weight"]])
        out[b + "attn.q_bias"], out[b + "attn.v_bias"] = sd[a + "query.bias"], sd[a + "value.bias"]
        out[b + "attn.relative_position_bias_table"] = torch.zeros(52, 4)
        out[b + "gamma_1"], out[b + "gamma_2"] = sd[h + "lambda_1"], sd[h + "lambda_2"]
    out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    out["head.weight"], out["head.bias"] = torch.zeros(10, 64), torch.zeros(10)
    return out


def timm_vit_layout(beit_v2: dict) -> dict:
    """The same weights in timm's VisionTransformer layout: qkv with a fused bias (k's zero), ls1/ls2.gamma."""
    out = {}
    for k, v in beit_v2.items():
        if k.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
            continue
        out[k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = v
    for i in range(2):
        b = f"blocks.{i}.attn."
        out[b + "qkv.bias"] = torch.cat([beit_v2[b + "q_bias"], torch.zeros(64), beit_v2[b + "v_bias"]])
    return out


def test_beit_v2_and_timm_layouts_match_transformers_beit(tmp_path):
    """Layer scale folded into the projections and q/v-only biases agree with transformers' BEiT layers; the
    same weights in the timm ViT layout give the same encoder."""
    model = hf_beit()
    hf_path, beit_path, timm_path = tmp_path / "hf.safetensors", tmp_path / "beitv2.pth", tmp_path / "timm.pth"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, hf_path)
    beit_v2 = beit_v2_layout(model)
    torch.save({"model": beit_v2}, beit_path)
    torch.save(timm_vit_layout(beit_v2), timm_path)
    reports = {}
    for name, path in (("hf", hf_path), ("beit", beit_path), ("timm", timm_path)):
        encoder = fresh_encoder()
        reports[name] = load_pretrained_encoder(encoder, path)
        assert reports[name].layout == name
        assert_matches_transformers(encoder, model)
        assert reports[name].kept == ["to_latent.bias", "to_latent.weight"]
    assert set(reports["beit"].unused) == {"cls_token", "head.bias", "head.weight",
                                           "blocks.0.attn.relative_position_bias_table",
                                           "blocks.1.attn.relative_position_bias_table"}


def beit3_layout(model: ViTModel) -> dict:
    """transformers' ViT weights -> BEiT-3's torchscale names: multiway modules (`.A` vision expert, `.B` text
    expert), separate q/k/v projections, sub-LayerNorms, fairseq position table (2 padding rows, class token)."""
    sd, out = model.state_dict(), {}
    out["beit3.text_embed.weight"] = torch.zeros(100, 64)
    out["beit3.vision_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out["beit3.vision_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    out["beit3.vision_embed.cls_token"] = sd["embeddings.cls_token"]
    out["beit3.vision_embed.mask_token"] = torch.zeros(1, 1, 64)
    pos = sd["embeddings.position_embeddings"][0]  # [cls + 16 patches, 64]
    out["beit3.encoder.embed_positions.A.weight"] = torch.cat([torch.full((2, 64), 7.0), pos])
    out["beit3.encoder.embed_positions.B.weight"] = torch.zeros(1026, 64)

    def multiway(name, tensor):
        out[f"beit3.{name.replace('#', 'A')}"] = tensor
        out[f"beit3.{name.replace('#', 'B')}"] = torch.zeros_like(tensor)

    for i in range(2):
        h, b = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        a = h + "attention.attention."
        for leaf in ("weight", "bias"):
            multiway(f"{b}self_attn_layer_norm.#.{leaf}", sd[f"{h}layernorm_before.{leaf}"])
            for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
                multiway(f"{b}self_attn.{ours}_proj.#.{leaf}", sd[f"{a}{theirs}.{leaf}"])
            multiway(f"{b}self_attn.out_proj.#.{leaf}", sd[f"{h}attention.output.dense.{leaf}"])
            multiway(f"{b}self_attn.inner_attn_ln.#.{leaf}", torch.ones(64))
            multiway(f"{b}final_layer_norm.#.{leaf}", sd[f"{h}layernorm_after.{leaf}"])
            multiway(f"{b}ffn.fc1.#.{leaf}", sd[f"{h}intermediate.dense.{leaf}"])
            multiway(f"{b}ffn.ffn_layernorm.#.{leaf}", torch.ones(256))
            multiway(f"{b}ffn.fc2.#.{leaf}", sd[f"{h}output.dense.{leaf}"])
    for leaf in ("weight", "bias"):
        multiway(f"encoder.layer_norm.#.{leaf}", sd[f"layernorm.{leaf}"])
    return out


def test_beit3_layout_maps_the_vision_expert_and_reports_the_rest(tmp_path):
    model = hf_vit()
    path = tmp_path / "beit3_base_patch16_224.pth"
    torch.save({"model": beit3_layout(model)}, path)
    encoder = fresh_encoder()
    report = load_pretrained_encoder(encoder, path)
    assert report.layout == "beit3"
    # Same weights as the HF checkpoint: the vision expert, q/k/v fused in order, the two padding rows and the
    # class-token row of the position table dropped (their value 7 would show).
    assert_matches_transformers(encoder, model)
    unused = set(report.unused)
    assert {"encoder.layers.0.self_attn.inner_attn_ln.A.weight", "encoder.layers.1.ffn.ffn_layernorm.A.bias",
            "encoder.layers.0.ffn.fc1.B.weight", "encoder.embed_positions.B.weight", "text_embed.weight",
            "vision_embed.cls_token", "vision_embed.mask_token"} <= unused
    assert not any(k.endswith(".A.weight") and "layernorm" not in k and "inner_attn_ln" not in k for k in unused)


def test_position_grid_is_resized_bicubically_in_row_major_order(tmp_path):
    """A 16 px / patch 8 checkpoint (2x2 grid) into the 4x4 encoder: positions that vary only down the rows
    still vary only down the rows (a row/column mix-up would make them vary across), and keep their order."""
    model = hf_vit(image_size=16)
    with torch.no_grad():
        rows = torch.tensor([0.0, 0.0, 1.0, 1.0])[:, None] * torch.linspace(1, 2, 64)  # row-major 2x2: row 1 is 1
        model.embeddings.position_embeddings[0, 1:] = rows
        model.embeddings.position_embeddings[0, 0] = 99.0  # the class token row must not leak in
    path = tmp_path / "vit16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    encoder = fresh_encoder()
    report = load_pretrained_encoder(encoder, path)
    assert report.notes == ["position embeddings resized from a 2x2 to a 4x4 grid (bicubic)"]
    grid = encoder.pos_embed.detach()[0].reshape(4, 4, 64)
    assert torch.allclose(grid, grid[:, :1].expand_as(grid))  # constant along each row
    first_channel = grid[:, 0, 0]
    assert (first_channel[1:] > first_channel[:-1]).all() and grid.max() < 3
    assert torch.allclose(resize_pos_embed(torch.ones(4, 8), 4), torch.ones(16, 8))  # a constant stays constant


def test_shape_mismatches_are_named_per_key(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in hf_vit(hidden_size=32, intermediate_size=128).state_dict().items()}, path)
    with pytest.raises(ValueError, match="wide.safetensors") as err:
        load_pretrained_encoder(fresh_encoder(), path)
    message = str(err.value)
    assert "patch_embed.weight <- embeddings.patch_embeddings.projection: checkpoint (32, 3, 8, 8) vs encoder " \
           "(64, 3, 8, 8)" in message
    assert "blocks.1.mlp.0.weight <- encoder.layer.1.intermediate.dense: checkpoint (128, 32) vs encoder (256, 64)" \
           in message
    patch16 = tmp_path / "patch16.safetensors"
    save_file({k: v.contiguous() for k, v in hf_vit(patch_size=16).state_dict().items()}, patch16)
    with pytest.raises(ValueError, match=r"patch_embed.weight .*\(64, 3, 16, 16\) vs encoder \(64, 3, 8, 8\)"):
        load_pretrained_encoder(fresh_encoder(), patch16)


def test_unusable_files_are_clear_errors(tmp_path):
    deep = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in hf_vit(num_hidden_layers=3).state_dict().items()}, deep)
    with pytest.raises(ValueError, match="3 transformer blocks, the encoder 2"):
        load_pretrained_encoder(fresh_encoder(), deep)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, resnet)
    with pytest.raises(ValueError, match="resnet.pth: no ViT layout recognised"):
        load_pretrained_encoder(fresh_encoder(), resnet)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _NotATensor()}, pickled)
    with pytest.raises(ValueError, match="pickled.pth is not readable weights-only"):
        load_pretrained_encoder(fresh_encoder(), pickled)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained_encoder(fresh_encoder(), tmp_path / "missing.pth")


class _NotATensor:
    pass
