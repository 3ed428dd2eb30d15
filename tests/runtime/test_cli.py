"""The one dataclass -> command line layer: every field of both trainers' configs round-trips through its
option, and pretraining's flags keep their spelling."""
import argparse
import typing
from dataclasses import fields

import pytest

from latentlm_mcore.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig, get_preset
from latentlm_mcore.runtime.cli import add_config_arguments, apply_overrides, config_overrides
from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAEConfig

try:  # the σ-VAE's training options
    from latentlm_mcore.vae.config import TrainConfig as VAETrainConfig
except ImportError:
    from latentlm_mcore.vae.trainer import TrainConfig as VAETrainConfig


def _other_value(hint, current):
    """A value of type `hint` that differs from `current`, and how it is spelled on the command line."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal or any(typing.get_origin(a) is typing.Literal for a in args):
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else typing.get_args(args[0])
        value = next(c for c in choices if c != current)
        return value, value
    kind = args[0] if args and type(None) in typing.get_args(hint) else hint
    if kind is bool:
        return (not current), str(not current).lower()
    if kind is int:
        value = current * 2 if current else 2
        return value, str(value)
    if kind is float:
        value = (current or 0.25) * 2
        return value, repr(value)
    if kind is str:
        return "some/path", "some/path"
    raise AssertionError(f"no test value for {hint}")


# (dataclass, the option prefix, the config the overrides apply to, how to read a field back)
SECTIONS = [
    (ModelConfig, "model.", get_preset("tiny"), lambda cfg, name: getattr(cfg.model, name)),
    (TrainConfig, "train.", get_preset("tiny"), lambda cfg, name: getattr(cfg.train, name)),
    (ParallelConfig, "parallel.", get_preset("tiny"), lambda cfg, name: getattr(cfg.parallel, name)),
    (RunConfig, "", RunConfig(), getattr),
    (SigmaVAEConfig, "model.", SIGMA_VAE_PRESETS["tiny"], getattr),
    (VAETrainConfig, "", VAETrainConfig(), getattr),
]


@pytest.mark.parametrize("cls,prefix,base,read", SECTIONS, ids=lambda x: getattr(x, "__qualname__", None))
def test_every_field_round_trips_through_its_option(cls, prefix, base, read):
    hints = typing.get_type_hints(cls)
    nested = read is not getattr  # pretraining's sections live inside one LatentLMConfig
    for f in fields(cls):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser, cls, prefix)
        want, raw = _other_value(hints[f.name], read(base, f.name))
        args = parser.parse_args([f"--{prefix}{f.name.replace('_', '-')}", raw])
        given = config_overrides(args, prefix)
        assert given == {f.name: raw}, f.name
        cfg = apply_overrides(base, {(prefix if nested else "") + k: v for k, v in given.items()})
        got = read(cfg, f.name)
        assert got == want and type(got) is type(want), (f.name, raw, got)
        assert read(base, f.name) != want, "the override applies to a copy"


def test_pretraining_flags_keep_their_spelling():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")  # an entry point's own option: not a config field
    add_config_arguments(parser, RunConfig)
    for cls, section in ((ModelConfig, "model."), (TrainConfig, "train."), (ParallelConfig, "parallel.")):
        add_config_arguments(parser, cls, section)
    args = parser.parse_args(["--save", "runs/x", "--log-interval", "3", "--fp8", "hybrid", "--exit-after", "none",
                              "--train.train-steps", "5", "--parallel.tensor-parallel", "2",
                              "--model.num-query-groups", "2", "--tensorboard", "false"])
    assert config_overrides(args, cls=RunConfig) == {"save": "runs/x", "log_interval": "3", "fp8": "hybrid", "exit_after": "none",
                                      "tensorboard": "false"}
    run = apply_overrides(RunConfig(), config_overrides(args, cls=RunConfig))
    assert (run.save, run.log_interval, run.fp8, run.exit_after, run.tensorboard) == ("runs/x", 3, "hybrid", None, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--fp8", "e5m2"])  # not a choice


def test_bad_values_and_keys_are_named():
    with pytest.raises(ValueError, match="'train.lr': cannot parse 'fast' as float"):
        apply_overrides(get_preset("tiny"), {"train.lr": "fast"})
    with pytest.raises(ValueError, match="'tensorboard'.*'maybe'"):
        apply_overrides(RunConfig(), {"tensorboard": "maybe"})
    with pytest.raises(KeyError, match="model.nope"):
        apply_overrides(get_preset("tiny"), {"model.nope": "1"})
    with pytest.raises(ValueError, match="patch_size"):  # the config's own checks run on the result
        apply_overrides(SIGMA_VAE_PRESETS["tiny"], {"image_size": "36"})


def test_audio_vae_strides_parse_from_a_comma_list():
    from latentlm_mcore.vae.audio_config import AUDIO_VAE_PRESETS, AudioVAEConfig
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, AudioVAEConfig, "model.")
    args = parser.parse_args(["--model.strides", "8,5,10", "--model.latent-dim", "32"])
    cfg = apply_overrides(AUDIO_VAE_PRESETS["tiny"], config_overrides(args, "model."))
    assert cfg.strides == (8, 5, 10) and cfg.hop_length == 400 and cfg.latent_dim == 32
    assert AUDIO_VAE_PRESETS["tiny"].strides == (2, 4, 5, 10)  # the preset itself is untouched
    with pytest.raises(ValueError, match="'strides': cannot parse '8,x' as tuple"):
        apply_overrides(AUDIO_VAE_PRESETS["tiny"], {"strides": "8,x"})
