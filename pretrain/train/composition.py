"""Configuration by Hydra's compose API onto dataclass schemas, for every config-driven command.

A command's schema is a dataclass (pretraining's TrainConfig, fine-tuning's FinetuneConfig,
evaluation's EvaluateArgs, an experiment's own); Hydra composes its entry config in configs/
with command-line overrides (key=value, group=option) and `to_schema` merges the result into
the schema, whose dataclasses check their own keys when made. An unknown or mistyped key, a
wrong type or an invalid value is a one-line UserError naming the key's full name.

We use Hydra's compose API rather than @hydra.main on purpose: under `deepspeed` or
`torchrun` every rank parses the same overrides, and compose neither changes directory, nor
creates outputs/ folders, nor configures logging, so nothing depends on the rank.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.errors import UserError, require

from ..model import ModelConfig

# pretrain/configs links to the top-level configs/ in a checkout and is a copy in an installed wheel.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def non_finite_numbers(node, prefix: str = ""):
    """(key, value) of every NaN or infinite number anywhere in a config tree."""
    if is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in fields(node)]
    elif isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(node)]
        prefix = prefix[:-1]  # key[0], not key.[0]
    else:
        return
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, float) and not math.isfinite(value):
            yield key, value
        else:
            yield from non_finite_numbers(value, key + ".")


def check_finite(config) -> None:
    """UserError naming the first NaN or infinite number anywhere in a config tree (e.g.
    model.init_std=inf would pass every range check)."""
    for key, value in non_finite_numbers(config):
        require(False, key, "must be a finite number", value)


def schema(cls) -> DictConfig:
    """A config dataclass (TrainConfig, or another command's schema) as an OmegaConf node with
    every key and its default."""
    base = OmegaConf.structured(cls)
    # Building the schema instantiates ModelConfig(), whose __post_init__ fills n_kv_heads and
    # ffn_hidden from the default d_model/n_heads: reset them so they follow the merged values.
    if "model" in base and OmegaConf.is_config(base.model) and "n_kv_heads" in base.model:
        for f in fields(ModelConfig):
            if f.default is None:
                base.model[f.name] = None
        OmegaConf.set_struct(base.model.rope_scaling, False)  # free-form, as transformers' rope_parameters
    return base


def to_schema(tree: DictConfig | dict, cls):
    """Merge a composed config tree into the schema `cls`, whose dataclasses check their keys when
    made. UserError names the key."""
    try:
        # Plain containers: a typed tree (Hydra composes onto the schema) would carry keys added
        # with "+key=value" through the merge unchecked.
        plain = OmegaConf.to_container(tree, resolve=True, throw_on_missing=True) if isinstance(tree, DictConfig) else tree
        merged = OmegaConf.merge(schema(cls), plain)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        if isinstance(err.__cause__, ValueError):  # raised by a schema's own __post_init__
            raise UserError(str(err.__cause__)) from None
        raise _config_error(err, cls) from None
    except ValueError as err:  # a schema's own __post_init__: omegaconf wraps only TypeError
        raise UserError(str(err)) from None
    return config


def expected_type(key: str, cls) -> str | None:
    """The schema type of a dotted key ("trainer.max_steps" -> "int"), None if unknown."""
    node = cls
    for part in key.split("."):
        hints = typing.get_type_hints(node) if is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
    text = re.sub(r"typing\.|builtins\.|<class '(\w+)'>", r"\1", str(node))
    return text.replace("NoneType", "null").replace(" | ", " or ")


def _config_error(err: OmegaConfBaseException, cls) -> UserError:
    """One line naming the key, the value and, for a type mismatch, the expected type."""
    key = getattr(err, "full_key", None) or "?"
    value = getattr(err, "value", None)
    first_line = str(err).splitlines()[0]
    wanted = expected_type(key, cls) if "convert" in first_line or "type" in first_line else None
    if wanted is not None:
        return UserError(f"config key {key}={value!r}: expected {wanted}")
    return UserError(f"config key {key}: {first_line}")


def compose(overrides, *, cls, config_name: str, config_dir: Path | str = CONFIG_DIR) -> DictConfig:
    """Hydra composition of configs/<config_name>.yaml with command-line style overrides
    (key=value, group=option). The entry config's defaults list starts with `<config_name>_schema`,
    the schema `cls` stored here, so every key can be overridden and the yaml files are checked."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema(cls))
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None, job_name="biglearn"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        if isinstance(err.__cause__, OmegaConfBaseException):  # an override of the wrong type
            raise _config_error(err.__cause__, cls) from None
        # Hydra's message already names the key or group option (e.g. "Key 'd_modle' is not in struct").
        raise UserError(f"config error: {' '.join(str(err).split())}") from None


def to_yaml(config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def load(overrides, *, cls, config_name: str, config_dir: Path | str = CONFIG_DIR):
    """configs/<config_name>.yaml composed with `overrides` and checked against the schema `cls`."""
    return to_schema(compose(overrides, cls=cls, config_name=config_name, config_dir=config_dir), cls)
