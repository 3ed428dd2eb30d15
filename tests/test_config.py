import pytest

from latentlm_mcore.config import PRESETS, apply_overrides, count_parameters, get_preset


def test_mllm_preset_is_appendix_d():
    cfg = get_preset("mllm-1.3b")
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (24, 2048, 6144, 16)
    assert (m.vocab_size, m.seq_length, m.head_layers) == (100_288, 4096, 6)
    assert (t.adam_beta1, t.adam_beta2, t.lr, t.warmup_steps, t.weight_decay) == (0.9, 0.98, 3e-4, 500, 0.1)
    assert cfg.tokens_per_step == 4096 * 1024  # "4M" tokens
    assert cfg.tokens_per_step * t.train_steps == pytest.approx(1.0e12, rel=0.05)  # the 1T-token schedule


def test_mllm_parameter_count_by_hand():
    h, f, v, L, d = 2048, 6144, 100_288, 24, 32
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q,k,v,o + SwiGLU + two RMSNorms
    backbone = L * per_layer + h  # + final norm
    f_head = 5461  # 8/3 * 2048
    head_block = h + (3 * h * h + 3 * h) + 3 * h * f_head  # norm, AdaLN (shift/scale/gate) with bias, SwiGLU
    head = (h + h * h) + (256 * h + h + h * h + h) + d * h + 6 * head_block + (2 * h * h + 2 * h) + h * d
    counts = count_parameters(get_preset("mllm-1.3b").model)
    assert counts["transformer"] == backbone == 1_308_723_200
    assert counts["embedding"] == counts["output_layer"] == v * h
    assert counts["latent_projection"] == d * h
    assert counts["diffusion_head"] == head
    assert counts["total"] == backbone + 2 * v * h + d * h + head


IMAGENET_TRAIN_IMAGES = 1_281_167


def test_imagenet_presets_follow_table_7():
    # LatentLM in Table 7: FFN 4d, 3-layer head (FFN 4d as in the official code), 75k steps ~ 120 epochs, CFG 1.75;
    # the parameter counts are Table 7's (its vocabulary is 1000 classes, ours 1024 ids)
    expected = {"imagenet-m": (1024, 24, 16, 455e6), "imagenet-l": (1536, 24, 12, 1.03e9),
                "imagenet-xl": (2048, 24, 16, 1.82e9), "imagenet-3b": (2560, 32, 20, 3.68e9)}
    for name, (h, layers, heads, params) in expected.items():
        cfg = get_preset(name)
        m, t = cfg.model, cfg.train
        assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size) == (h, layers, heads, 4 * h)
        assert (m.head_layers, m.head_ffn_hidden_size) == (3, 4 * h)
        assert count_parameters(m)["transformer"] == layers * (16 * h * h + 2 * h) + h
        assert count_parameters(m)["total"] == pytest.approx(params, rel=0.01), name
        assert (t.global_batch_size, t.train_steps) == (2048, 75_000)
        assert t.global_batch_size * t.train_steps / IMAGENET_TRAIN_IMAGES == pytest.approx(120, rel=0.01)
        assert cfg.cfg_scale == 1.75


def test_table_1_system_preset():
    cfg = get_preset("imagenet-latentlm-l")
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.head_layers) == (32, 1024, 2730, 6)
    assert m.head_ffn_hidden_size == 2730  # the 8/3 d default
    assert count_parameters(m)["total"] == pytest.approx(479e6, rel=0.005)  # Table 1: 479M
    assert (t.lr, t.warmup_steps, t.weight_decay, t.adam_beta1, t.adam_beta2) == (5e-4, 100, 0.1, 0.9, 0.98)
    assert (t.global_batch_size, t.train_steps) == (2048, 250_000)
    assert t.global_batch_size * t.train_steps / IMAGENET_TRAIN_IMAGES == pytest.approx(400, rel=0.01)
    assert cfg.cfg_scale == 1.65


def test_head_ffn_defaults_to_eight_thirds_of_its_width_and_is_configurable():
    from latentlm_mcore.config import ModelConfig

    base = dict(num_layers=2, hidden_size=96, ffn_hidden_size=256, num_attention_heads=4, vocab_size=128,
                seq_length=16, latent_dim=8, head_layers=2)
    assert ModelConfig(**base).head_ffn_hidden_size == 256
    assert ModelConfig(**base, head_hidden_size=48).head_ffn_hidden_size == 128
    assert ModelConfig(**base, head_ffn_hidden_size=96).head_ffn_hidden_size == 96
    assert get_preset("quickstart").model.head_ffn_hidden_size == 128  # what its digits were measured with


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_counts(name):
    cfg = get_preset(name)
    assert cfg.name == name
    parts = count_parameters(cfg.model)
    total = parts.pop("total")
    assert total == sum(parts.values())  # the parts add up: none missing, none counted twice
    assert (parts["output_layer"] == 0) == cfg.model.tie_embeddings
    assert parts["embedding"] == cfg.model.vocab_size * cfg.model.hidden_size
    assert parts["latent_projection"] == cfg.model.latent_dim * cfg.model.hidden_size


def test_overrides_parse_types_and_reject_unknown_keys():
    cfg = apply_overrides(get_preset("tiny"), {"model.num_layers": "3", "train.lr": "0.01",
                                               "parallel.sequence_parallel": "true"})
    assert cfg.model.num_layers == 3 and cfg.train.lr == 0.01 and cfg.parallel.sequence_parallel is True
    assert get_preset("tiny").model.num_layers == 2  # presets are fresh objects
    with pytest.raises(KeyError, match="model.nope"):
        apply_overrides(cfg, {"model.nope": "1"})
    with pytest.raises(ValueError, match="model.num_layers"):
        apply_overrides(cfg, {"model.num_layers": "two"})
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("gpt-5")
