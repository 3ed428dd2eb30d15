"""A checkpoint written with the local spec (every CPU run) loads into a model whose modules describe
Transformer Engine's `_extra_state` (FP8 scaling state), which the checkpoint does not hold; a real
weight missing from the checkpoint is still an error."""
import io

import pytest
import torch

from latentlm_mcore.config import ModelConfig, ParallelConfig
from latentlm_mcore.model import build_model, local_block_spec, transformer_config
from latentlm_mcore.training.checkpoint import drop_absent_extra_state, load_model, model_sharded_state_dict, save_model

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=128,
                    seq_length=16, latent_dim=4, head_layers=1)


class TEExtraState(torch.nn.Module):
    """Stands in for a TE layer: a module with extra state (TE keeps FP8 meta in it, as a byte stream)."""

    def __init__(self):
        super().__init__()
        self.loaded = None

    def get_extra_state(self):
        return io.BytesIO(b"fp8 meta")

    def set_extra_state(self, state):
        self.loaded = state


def build():
    config = transformer_config(MODEL, ParallelConfig())
    return build_model(MODEL, config, block_spec=local_block_spec(config))


def test_local_checkpoint_loads_into_a_model_with_te_extra_state(world, tmp_path):
    saved = build()
    save_model([saved], str(tmp_path / "ckpt"))
    torch.manual_seed(99)
    te_like = build()
    # TE's attention (TEDotProductAttention) has FP8 extra state; megatron's local attention has none
    te_like.decoder.layers[0].self_attention.core_attention.fp8_meta = TEExtraState()
    state = drop_absent_extra_state(model_sharded_state_dict([te_like]), str(tmp_path / "ckpt"))["model"]
    assert "decoder.layers.0.self_attention.core_attention.fp8_meta._extra_state" not in state
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in state, "saved extra state must load"
    load_model([te_like], str(tmp_path / "ckpt"))
    got = te_like.state_dict()
    for name, want in saved.state_dict().items():
        if torch.is_tensor(want):
            assert torch.equal(want, got[name]), name


def test_a_missing_weight_is_still_an_error(world, tmp_path):
    save_model([build()], str(tmp_path / "ckpt"))
    bigger = build()
    bigger.extra_weight = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(BaseException, match="extra_weight"):  # torch's CheckpointException is a BaseException
        load_model([bigger], str(tmp_path / "ckpt"))
