"""The EMA of the weights (training/ema.py): the update against a hand-computed EMA of the parameters, the
checkpoint round trip in one process, exact resume with the EMA on at TP=2 (stop at step k, resume, the EMA at
step N equals the uninterrupted run's bit for bit), and the TP=2 checkpoint's EMA loaded at TP=1 by the trainer
equal to what was saved (the inference loader's: tests/hf/test_export_ema.py)."""
import pytest
import torch

from latentlm_mcore.config import LatentLMConfig, ModelConfig, RunConfig, TrainConfig
from tests.conftest import EMA_DECAY, EMA_STEPS, REPO, ema_run_args, run_torchrun
from tests.training.test_resume import checkpoint_tensors

PRETRAIN = REPO / "pretrain" / "pretrain_latentlm.py"
DECAY = EMA_DECAY


def tiny_config(ema_decay=DECAY) -> LatentLMConfig:
    model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=128,
                        seq_length=32, latent_dim=8, head_layers=1)
    return LatentLMConfig("ema-test", model, TrainConfig(lr=1e-2, warmup_steps=0, train_steps=10, global_batch_size=2,
                                                         micro_batch_size=1, ema_decay=ema_decay))


def trainer(cfg, save=None):
    from latentlm_mcore.training.trainer import Trainer

    torch.manual_seed(0)
    t = Trainer(cfg, RunConfig(precision="fp32", save=str(save) if save else "unused", keep_last=5))
    t.data = t.data_stream(None, seed=0)
    return t


def params(t) -> dict:
    return {name: p.detach().clone() for name, p in t.chunks[0].module.named_parameters()}


def ema_of(t) -> dict:
    (ema,) = [c for c in t.callbacks if c.name == "ema"]
    full = ema.full_tensors()
    return {name: full[p].clone() for name, p in t.chunks[0].module.named_parameters()}


def test_update_equals_a_hand_computed_ema(world):
    t = trainer(tiny_config())
    want = params(t)  # DiT starts the EMA as a copy of the initial weights
    assert all(torch.equal(ema_of(t)[k], want[k]) for k in want)
    batches = iter(t.data)
    for _ in range(4):
        t.step(batches)
        now = params(t)
        want = {k: DECAY * want[k] + (1 - DECAY) * now[k] for k in want}
    got = ema_of(t)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=f"EMA of {k}")
    moved = [k for k in want if not torch.allclose(got[k], now[k])]
    assert len(moved) > len(want) // 2, "after 4 steps at decay 0.8 the EMA differs from the weights"


def test_checkpoint_round_trip_and_a_run_without_ema_state(world, tmp_path):
    t = trainer(tiny_config(), tmp_path / "ckpt")
    batches = iter(t.data)
    for _ in range(3):
        t.step(batches)
    path = t.save_checkpoint()
    saved = ema_of(t)
    stored = checkpoint_tensors(tmp_path / "ckpt" / "iter_0000003", tmp_path)
    ema = {k[len("callbacks.ema."):]: v for k, v in stored.items() if k.startswith("callbacks.ema.")}
    weights = {k: v for k, v in stored.items() if k in ema}
    assert ema.keys() == weights.keys() and len(ema) > 10, "one EMA tensor per weight, under the model's own key"
    assert torch.equal(ema["embedding.word_embeddings.weight"], saved["embedding.word_embeddings.weight"])
    assert all(v.dtype == torch.float32 for v in ema.values())
    assert sum(not torch.equal(ema[k], weights[k]) for k in ema) > len(ema) // 2

    resumed = trainer(tiny_config())
    resumed.resume(path)
    got = ema_of(resumed)
    assert all(torch.equal(got[k], saved[k]) for k in saved), "the EMA comes back bit for bit"

    # a checkpoint of a run without EMA: the EMA starts from the loaded weights
    plain = trainer(tiny_config(ema_decay=0.0), tmp_path / "plain")
    plain.step(iter(plain.data))
    plain_path = plain.save_checkpoint()
    assert not any(k.startswith("callbacks.") for k in checkpoint_tensors(tmp_path / "plain" / "iter_0000001", tmp_path))
    started = trainer(tiny_config())
    started.resume(plain_path)
    got, weights = ema_of(started), params(started)
    assert all(torch.equal(got[k], weights[k]) for k in weights)


def test_decay_outside_the_unit_interval_is_refused():
    from latentlm_mcore.training.ema import ExponentialMovingAverage

    with pytest.raises(ValueError, match=r"train.ema_decay must be in \(0, 1\)"):
        ExponentialMovingAverage(1.0)


def test_presets_keep_an_ema_for_class_conditional_images_only():
    from latentlm_mcore.config import PRESETS, get_preset

    for name in PRESETS:
        # DiT's 0.9999 at ImageNet scale; the 1,000-step digits demo needs a shorter horizon (0.99: ~100 steps)
        want = 0.9999 if name.startswith("imagenet") else 0.99 if name == "classcond-digits" else 0.0
        assert get_preset(name).train.ema_decay == want, name


# ---------------------------------------------------------------- TP=2 under torchrun
STEPS = EMA_STEPS


@pytest.mark.slow  # torchrun and the session ema_run fixture
def test_exact_resume_with_ema_at_tp2(tiny_dataset, ema_run, tmp_path):
    save = tmp_path / "ckpt"
    run_torchrun(PRETRAIN, 2, ema_run_args(tiny_dataset, save, "--exit-after", 2), tmp_path)  # steps 1-2
    run_torchrun(PRETRAIN, 2, ema_run_args(tiny_dataset, save), tmp_path)  # resumes at 2, to the end
    final = f"iter_{STEPS:07d}"
    want = checkpoint_tensors(ema_run / final, tmp_path)
    got = checkpoint_tensors(save / final, tmp_path)
    ema = [k for k in want if k.startswith("callbacks.ema.")]
    assert len(ema) > 10 and all(k[len("callbacks.ema."):] in want for k in ema), "an EMA tensor per weight"
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs after resuming"


@pytest.mark.slow  # torchrun and the session ema_run fixture
def test_tp2_ema_loads_at_tp1(tiny_dataset, ema_run, tmp_path):
    """The trainer resumed at TP=1 from the TP=2 checkpoint at its last step holds the EMA that was saved; one more
    step gives decay * saved EMA + (1 - decay) * the weights after it."""
    save = tmp_path / "tp1"
    source = ema_run / f"iter_{STEPS:07d}"
    run_torchrun(PRETRAIN, 1, ema_run_args(tiny_dataset, save, "--load", str(source), "--train.train-steps", STEPS + 1,
                                   tp=1), tmp_path)
    before = checkpoint_tensors(source, tmp_path)
    after = checkpoint_tensors(save / f"iter_{STEPS + 1:07d}", tmp_path)
    ema = [k for k in before if k.startswith("callbacks.ema.")]
    assert ema and set(ema) == {k for k in after if k.startswith("callbacks.ema.")}
    for k in ema:
        weight = k[len("callbacks.ema."):]
        want = DECAY * before[k] + (1 - DECAY) * after[weight]
        torch.testing.assert_close(after[k], want, rtol=1e-6, atol=1e-7, msg=k)
