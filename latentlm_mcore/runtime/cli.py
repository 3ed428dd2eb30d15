"""Dataclass configs on the command line: one option per field, `--{section.}field-name VALUE`.

Entry points call `add_config_arguments(parser, Cls, "section.")` per config section (no prefix for the
section of plain run options), read what was given with `config_overrides(args, "section.")` and apply it
with `apply_overrides(cfg, {"section.field": raw})`. Every option defaults to None (= keep the preset's
value); values are parsed by the field's annotation (bool: 1/0/true/false/yes/no; Optional: "none" is None;
Literal: one of its choices). The library itself never reads a command line.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Literal


def _literal_choices(hint) -> list:
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    return [c for a in typing.get_args(hint) if typing.get_origin(a) is Literal for c in typing.get_args(a)]


def add_config_arguments(parser, cls, prefix: str = "") -> None:
    """One option per field of dataclass `cls`: `--{prefix}{field with - for _}`, dest `{prefix}{field}`."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        choices = _literal_choices(hints[f.name])
        default = f.default if f.default is not MISSING else "preset"
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{prefix}{f.name}", default=None,
                            choices=choices or None, metavar=None if choices else f.name.upper(),
                            help=f"(default: {default})")


def config_overrides(args, prefix: str = "", cls=None) -> dict:
    """The options given on the command line for fields with `prefix`, as {field: raw string}. Without a
    prefix: the options of no section (names without a dot). With `cls`: only that dataclass's fields (other
    options of the entry point, e.g. --preset, are not config fields)."""
    names = {f.name for f in fields(cls)} if cls is not None else None
    return {k[len(prefix):]: v for k, v in vars(args).items()
            if v is not None and k.startswith(prefix) and (prefix or "." not in k)
            and (names is None or k[len(prefix):] in names)}


def apply_overrides(cfg, overrides: dict):
    """A copy of `cfg` with dotted overrides applied, e.g. {"model.num_layers": "4"} (or {"lr": "1e-3"} on a
    flat dataclass). Strings are parsed by the field's annotation; unknown keys raise naming the key."""
    cfg = copy.deepcopy(cfg)
    for key, raw in overrides.items():
        obj, parts = cfg, key.split(".")
        for part in parts[:-1]:
            if not hasattr(obj, part):
                raise KeyError(f"unknown config key {key!r}")
            obj = getattr(obj, part)
        leaf = parts[-1]
        if not is_dataclass(obj) or leaf not in {f.name for f in fields(obj)}:
            raise KeyError(f"unknown config key {key!r}")
        hint = typing.get_type_hints(type(obj))[leaf]
        object.__setattr__(obj, leaf, parse_value(hint, raw, key))  # frozen configs too (on the copy)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()  # the config's own checks see the overridden values
    return cfg


def parse_value(hint, raw, key: str):
    """`raw` (a command-line string) as a value of type `hint`; non-strings pass through."""
    if not isinstance(raw, str):
        return raw
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and raw.lower() == "none":
        return None
    kinds = [a for a in args if a is not type(None)] if optional else [hint]
    kind = kinds[0] if len(kinds) == 1 else hint
    choices = _literal_choices(kind)
    if choices:
        if raw not in choices:
            raise ValueError(f"config key {key!r}: {raw!r} is not one of {choices}")
        return raw
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind in (int, float, str):
            return kind(raw)
        if kind is tuple or typing.get_origin(kind) is tuple:  # "8,5,10" (e.g. --model.strides of the audio σ-VAE)
            return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"config key {key!r}: cannot parse {raw!r} as {kind.__name__}") from None
    raise TypeError(f"config key {key!r}: no command-line parser for fields of type {hint}")
