"""
Configuration from TOML files and `key=value` overrides into dataclasses, with fixed precedence:

    dataclass defaults  <  each .toml file named (in order)  <  key=value / --key=value on the command line

A typo is an error naming the nearest valid key, a value of the wrong type is an error naming the key,
and the resolved config is printed with where each setting came from. The dataclasses themselves stay
where they are documented (ModelConfig in model.py, TrainConfig in train.py) and validate their own
ranges in __post_init__; this file imports nothing of the project, so any file can use it.
"""

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing


class ConfigError(ValueError):
    pass


def parse_value(name, typ, raw):
    """A command-line string (or TOML value) as the field's type, or a ConfigError saying why not."""
    base = typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X]
        base = next(a for a in typing.get_args(typ) if a is not type(None))
        if isinstance(raw, str) and raw.lower() in ("none", "null"):
            return None
    if isinstance(raw, str) and base is not str:
        low = raw.lower()
        if base is bool:
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ConfigError(f"{name}={raw!r}: expected true or false")
        try:
            value = float(raw) if base is float else int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected {base.__name__}") from None
    elif base is float and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, base) and not (base is not bool and isinstance(raw, bool)):
        value = raw
    else:
        raise ConfigError(f"{name}={raw!r}: expected {base.__name__}, got {type(raw).__name__}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r}: must be a finite number")
    return value


def read_toml(path):
    """The table of a TOML file, or a ConfigError naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (presets live in config/)")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}): fix it, or pass another file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None


def load_config(argv, classes, ignore_unknown=False):
    """argv: .toml paths and key=value / --key=value overrides; classes: the config dataclasses whose
    fields they set (field names are unique across them). Returns (instances in the order of classes,
    sources): sources maps each key that was set to where it was set. ignore_unknown: keys of none of
    the classes are left out (and listed in sources under None) instead of being errors."""
    hints = {}
    for cls in classes:
        hints.update({f.name: (cls, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)})
    values, sources, ignored = {}, {}, []

    def put(key, raw, source):
        if key not in hints:
            if ignore_unknown:
                ignored.append(key)
                return
            near = difflib.get_close_matches(key, hints, n=1, cutoff=0.5)
            where = " and ".join(cls.__name__ for cls in classes)
            hint = f"; did you mean {near[0]!r}?" if near else f"; see the fields of {where}"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        values[key] = parse_value(key, hints[key][1], raw)
        sources[key] = source

    for arg in argv:
        if arg.endswith(".toml") and "=" not in arg:
            for k, v in read_toml(arg).items():
                put(k, v, arg)
        elif "=" in arg:
            k, v = arg.lstrip("-").split("=", 1)
            put(k.replace("-", "_"), v, "command line")
        else:
            raise ConfigError(f"argument {arg!r}: expected a config/*.toml file or key=value")
    try:
        instances = [cls(**{k: v for k, v in values.items() if hints[k][0] is cls}) for cls in classes]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ignored:
        sources[None] = ignored
    return instances, sources


def print_config(configs, sources):
    print("config (precedence: defaults < config files < command line):")
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            src = sources.get(f.name)
            print(f"  {f.name:<18} = {getattr(cfg, f.name)!r}" + (f"   [{src}]" if src else ""))


def setting(default, lo=None, hi=None, choices=None):
    """A dataclass field with its valid range [lo, hi] (inclusive) or its choices, which check_settings
    enforces: every numeric setting states its range where it is declared."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi), "choices": choices})


def check_settings(cfg):
    """ValueError naming the first setting of cfg outside its declared range or choices, or not finite."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        lo, hi = f.metadata.get("range", (None, None))
        choices = f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise ValueError(f"{f.name}={v!r}: use one of {', '.join(map(repr, choices))}")
        if v is None or isinstance(v, (str, bool)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name}={v}: must be a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"{f.name}={v} is out of range: it must be in [{lo}, {hi}]")


def merge_saved(current, saved, sources, launch_keys=()):
    """A resumed run's config: the settings it was saved with (saved: asdict of its config), except the
    launch settings (launch_keys: where and how this process runs) and every key given in a config file
    or on the command line (sources), which come from current. Returns (config, [each given key that
    differs from the saved value, for the start-up print])."""
    names = {f.name for f in dataclasses.fields(current)}
    values = {k: v for k, v in saved.items() if k in names}  # a key of an older version: dropped
    overrides = []
    for k in sorted(names):
        if k in launch_keys or k in sources:
            if k in values and k not in launch_keys and values[k] != getattr(current, k):
                overrides.append(f"{k}={getattr(current, k)!r} ({sources[k]}; saved {values[k]!r})")
            values[k] = getattr(current, k)
    try:
        return type(current)(**values), overrides
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the saved config is not valid here ({e}): give the setting on the command line") from None
