"""What a GPU run needs from the model, checked on the CPU: the replicated parameters (latent projection,
diffusion head) are created on the device megatron builds its layers on, so their TP broadcast runs there
(an NCCL group broadcasts CUDA tensors only); fusions are asked for only where their kernels import;
a model loaded for inference sits on one device."""
import sys
import types

import torch

from latentlm_mcore.config import ModelConfig, ParallelConfig
from latentlm_mcore.model import available_fusions, build_model, local_block_spec, transformer_config
from latentlm_mcore.model import latentlm as latentlm_module

MODEL = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=128,
                    seq_length=16, latent_dim=4, head_layers=1)


def test_init_device_follows_use_cpu_initialization(monkeypatch):
    config = transformer_config(MODEL, ParallelConfig())
    assert config.use_cpu_initialization and latentlm_module.init_device(config) == torch.device("cpu")
    config.use_cpu_initialization = False  # what a GPU run gets
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert latentlm_module.init_device(config) == torch.device("cuda", 3)


def test_replicated_params_are_broadcast_on_the_device_they_are_created_on(world, monkeypatch):
    """A TP=2 build whose init device is 'meta' (standing in for the GPU): every broadcast gets tensors on
    that device, never CPU tensors."""
    from megatron.core import parallel_state

    broadcast_devices = []
    monkeypatch.setattr(latentlm_module, "init_device", lambda config: torch.device("meta"))
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_global_rank", lambda group, rank: 0)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src, group: broadcast_devices.append(t.device))
    config = transformer_config(MODEL, ParallelConfig())
    model = build_model(MODEL, config, block_spec=local_block_spec(config))
    assert len(broadcast_devices) == len(model.replicated_params()) > 0
    assert set(broadcast_devices) == {torch.device("meta")}
    assert {p.device for p in model.replicated_params()} == {torch.device("meta")}


def test_no_fusion_is_asked_for_whose_kernel_is_absent(monkeypatch):
    for name in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                 "fused_weight_gradient_mlp_cuda"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine without apex / TE
    config = transformer_config(MODEL, ParallelConfig())
    assert not config.masked_softmax_fusion
    assert not config.gradient_accumulation_fusion
    assert not config.apply_rope_fusion


def test_a_fusion_is_on_where_its_kernel_imports(monkeypatch):
    for name in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert available_fusions(on_gpu=True)["masked_softmax_fusion"]
    assert not available_fusions(on_gpu=False)["masked_softmax_fusion"]


def test_inference_model_moves_to_the_compute_device(world, monkeypatch, tmp_path):
    """load_megatron_model puts every parameter on the compute device ('meta' standing in for cuda)."""
    from latentlm_mcore.config import LatentLMConfig
    from latentlm_mcore.inference import megatron as inference
    from latentlm_mcore.training import step
    from latentlm_mcore.training.checkpoint import save_model, save_run_config

    config = transformer_config(MODEL, ParallelConfig())
    directory = str(tmp_path / "iter_0000001")
    save_model([build_model(MODEL, config, block_spec=local_block_spec(config))], directory)
    save_run_config(directory, LatentLMConfig(name="t", model=MODEL))
    monkeypatch.setattr(inference, "init_single_process", lambda: None)  # the world of one is up already
    monkeypatch.setattr(step, "compute_device", lambda: torch.device("meta"))
    model, *_ = inference.load_megatron_model(directory)
    assert {p.device for p in model.parameters()} == {torch.device("meta")}
