"""LatentLMModel in one process: parameter count, next-token masks, causality, noise seeding."""
import pytest
import torch

from latentlm_mcore.config import ParallelConfig, count_parameters, get_preset
from latentlm_mcore.model import build_model, latentlm_loss, transformer_config
from latentlm_mcore.model.loss import count_targets
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.data.loader.synthetic import random_packed_batch


@pytest.fixture(scope="module")
def model():
    import os
    os.environ.setdefault("MASTER_PORT", str(__import__("tests.conftest", fromlist=["free_port"]).free_port()))
    cfg = get_preset("tiny").model
    init_distributed(ParallelConfig(), seed=3)
    m = build_model(cfg, transformer_config(cfg, ParallelConfig()))
    with torch.no_grad():  # leave AdaLN-Zero so the head's output depends on its inputs
        for p in m.diffusion_head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    yield m
    shutdown_distributed()


def run(model, batch):
    """(model outputs, (loss, report)) with the report's sums turned into this batch's mean losses."""
    out = model(batch["tokens"], batch["position_ids"], latents=batch["latents"], latent_mask=batch["latent_mask"],
                labels=batch["labels"], diffusion_targets=batch["diffusion_targets"],
                diffusion_mask=batch["diffusion_mask"], noise_seed=batch["noise_seed"])
    counts = count_targets(batch)
    loss, num_tokens, report = latentlm_loss(batch["loss_mask"], counts, torch.tensor(1.0), out)
    assert int(num_tokens) == int(counts[0])
    means = {"lm_loss": (report["lm_loss_sum"] / report["lm_targets"].clamp(min=1)).item(),
             "diffusion_loss": (report["diffusion_loss_sum"] / report["diffusion_targets"].clamp(min=1)).item()}
    return out, (loss, means)


def batch(model, images=2, seed=0):
    cfg = model.model_cfg
    return random_packed_batch(2, cfg.seq_length, cfg.vocab_size, cfg.latent_dim, num_latents=16,
                               images_per_sequence=images, seed=seed)


def test_parameter_count_equals_formula(model):
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.model_cfg)["total"]


def test_diffusion_targets_only_count_where_next_token_is_latent(model):
    b = batch(model)
    (_, ref) = run(model, b)
    off = b["diffusion_mask"] == 0
    b2 = dict(b, diffusion_targets=b["diffusion_targets"] + 5.0 * off.unsqueeze(-1))
    (_, same) = run(model, b2)
    assert same[1]["diffusion_loss"] == ref[1]["diffusion_loss"]
    b3 = dict(b, diffusion_targets=b["diffusion_targets"] + 5.0 * (~off).unsqueeze(-1))
    (_, moved) = run(model, b3)
    assert moved[1]["diffusion_loss"] > ref[1]["diffusion_loss"] + 1
    assert moved[1]["lm_loss"] == ref[1]["lm_loss"]


def test_masked_labels_do_not_count_and_placeholders_are_replaced(model):
    b = batch(model)
    (_, ref) = run(model, b)
    labels = torch.where(b["loss_mask"] > 0, b["labels"], torch.zeros_like(b["labels"]))
    tokens = torch.where(b["latent_mask"], torch.full_like(b["tokens"], 7), b["tokens"])
    (_, same) = run(model, dict(b, labels=labels, tokens=tokens))
    assert same[1]["lm_loss"] == ref[1]["lm_loss"] and same[1]["diffusion_loss"] == ref[1]["diffusion_loss"]


def test_causal_latent_inputs_only_affect_later_positions(model):
    b = batch(model, images=1, seed=4)
    (out, _) = run(model, b)
    first = int(b["latent_mask"][0].nonzero()[0])
    b2 = dict(b, latents=b["latents"].clone())
    b2["latents"][0, first] += 1.0
    (out2, _) = run(model, b2)
    lm, lm2 = out[0][0], out2[0][0]
    assert torch.equal(lm[:first], lm2[:first])
    assert not torch.allclose(lm[first:], lm2[first:])


def test_noise_seed_determines_the_diffusion_noise(model):
    b = batch(model)
    (_, a) = run(model, b)
    (_, again) = run(model, b)
    (_, other) = run(model, dict(b, noise_seed=b["noise_seed"] + 1))
    assert a[1]["diffusion_loss"] == again[1]["diffusion_loss"]
    assert a[1]["diffusion_loss"] != other[1]["diffusion_loss"]
    with pytest.raises(ValueError, match="noise_seed"):
        run(model, dict(b, noise_seed=None))


def test_batch_without_latents_still_touches_the_head_with_zero_weight(model):
    model.zero_grad(set_to_none=True)
    b = batch(model, images=0)
    (_, (loss, report)) = run(model, b)
    loss.backward()
    assert report["diffusion_loss"] == 0.0
    head_grads = [p.grad for p in model.diffusion_head.parameters()]
    assert all(g is not None for g in head_grads), "every head parameter takes part in the backward"
    assert all(torch.count_nonzero(g) == 0 for g in head_grads)
    assert model.output_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("images", [2, 0])
def test_diffusion_losses_read_nothing_back_from_the_device(model, images):
    """No host sync on the last stage's diffusion path: with the device-side tensors (hidden states,
    targets, head weights, noise) on the meta device, which holds no values, any .item(), .tolist(),
    nonzero or boolean-mask gather on them raises; the host fields (mask, seeds) stay on the CPU."""
    import copy

    b = batch(model, images=images)
    cfg = model.model_cfg
    head, sample_noise = model.diffusion_head, model._sample_noise

    def noise_on_meta(seed, n, s, device):
        assert device.type == "meta" and seed.device.type == "cpu"
        return tuple(x.to("meta") for x in sample_noise(seed, n, s, torch.device("cpu")))

    model.diffusion_head, model._sample_noise = copy.deepcopy(head).to("meta"), noise_on_meta
    try:
        hidden = torch.empty(cfg.seq_length, 2, cfg.hidden_size, device="meta")
        losses = model.diffusion_losses(hidden, b["diffusion_targets"].to("meta"), b["diffusion_mask"], b["noise_seed"])
    finally:
        model.diffusion_head = head
        del model._sample_noise  # the instance attribute: the method shows again
    assert losses.device.type == "meta"
    assert losses.shape == (max(int(b["diffusion_mask"].sum()), 1),)
