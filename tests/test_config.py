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
    head_block = h + (3 * h * h + 3 * h) + 3 * h * h  # norm, AdaLN (shift/scale/gate) with bias, SwiGLU (width h)
    head = (h + h * h) + (256 * h + h + h * h + h) + d * h + 6 * head_block + (2 * h * h + 2 * h) + h * d
    counts = count_parameters(get_preset("mllm-1.3b").model)
    assert counts["transformer"] == backbone == 1_308_723_200
    assert counts["embedding"] == counts["output_layer"] == v * h
    assert counts["latent_projection"] == d * h
    assert counts["diffusion_head"] == head
    assert counts["total"] == backbone + 2 * v * h + d * h + head


def test_imagenet_presets_follow_table_7():
    # LatentLM in Table 7 (FFN 4d): parameters of the Transformer without its tiny vocab
    expected = {"imagenet-m": (1024, 24, 16), "imagenet-l": (1536, 24, 12),
                "imagenet-xl": (2048, 24, 16), "imagenet-3b": (2560, 32, 20)}
    for name, (h, layers, heads) in expected.items():
        m = get_preset(name).model
        assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size) == (h, layers, heads, 4 * h)
        assert count_parameters(m)["transformer"] == layers * (16 * h * h + 2 * h) + h


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_counts(name):
    cfg = get_preset(name)
    assert cfg.name == name
    assert count_parameters(cfg.model)["total"] > 0


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
