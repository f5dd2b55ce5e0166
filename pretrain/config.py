"""Training configuration: Hydra composes configs/, dataclass schemas validate the result.

The schemas below are the single source of truth for every key. Hydra (compose API) reads
configs/train.yaml and the groups model/, objective/, data/, deepspeed/, trainer/, eval/ and
experiment/; `load_config` merges the composed tree into `TrainConfig`, so an unknown or
mistyped key, a wrong type or an invalid value fails at start with the key's full name.
The model and objective schemas are pretrain.model.ModelConfig and
pretrain.objectives.ObjectiveConfig, reused as they are.

We use Hydra's compose API rather than @hydra.main on purpose: under `deepspeed` or
`torchrun` every rank parses the same overrides, and compose neither changes directory, nor
creates outputs/ folders, nor configures logging, so nothing depends on the rank.
"""
from __future__ import annotations

import math
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import objectives
from .errors import UserError
from .loggers import LOGGERS
from .model import ModelConfig
from .objectives import EVAL_TASKS, ObjectiveConfig
from .vae.config import VAEExperiment, validate as validate_vae

# pretrain/configs links to the top-level configs/ in a checkout and is a copy in an installed wheel.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("model", "objective", "data", "deepspeed", "trainer", "eval", "experiment")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ACCELERATORS = ("auto", "cuda", "cpu")
DATA_KINDS = ("demo", "manifest")


@dataclass
class DataSource:
    manifest: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: str = "demo"  # "demo": build tokenizer + shards from the stdlib corpus; "manifest": use `manifest`
    manifest: str | None = None  # manifest written by data_pipeline (kind=manifest)
    demo_dir: str = "runs/demo_data"  # where kind=demo builds its data (reused when already built)
    demo_vocab_size: int = 2048
    demo_seq_len: int = 128
    demo_max_files: int = 0  # > 0: build the demo corpus from this many stdlib files only (faster)
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    # Weighted mix of datasets (pretrain.mixing), used instead of `manifest` when given:
    # [{manifest: PATH, weight: W}, ...]; all built with the same tokenizer.
    sources: list[DataSource] = field(default_factory=list)
    allow_external_shards: bool = False  # accept manifest shard paths outside the manifest's directory


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_param: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    precision: str = "auto"  # auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    accelerator: str = "auto"  # auto = cuda when available, else cpu (gloo)
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    initial_scale_power: int = 16  # fp16 dynamic loss scale starts at 2**this
    dist_timeout_s: float = 1800.0  # a collective waiting this long for a lost rank fails the run instead of hanging


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) after this much wall time
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (exact-resume tests)
    log_every: int = 10
    eval_every: int = 500  # 0: evaluate only at the end
    save_every: int = 1000  # 0: save only at the end and on signals
    keep_last: int = 3  # complete checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    export_at_end: bool = True  # consolidated fp32 weights in run_dir/export
    # metrics.jsonl (always: plots and resume checks read it) plus any of tensorboard, wandb, mlflow
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look the GPU up (no MFU on CPU)
    # each rank writes the sample keys of every micro-batch to run_dir/sample_keys/rank_NNNNN.jsonl
    log_sample_keys: bool = False


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    batches: int = 8  # validation batches per task (the same windows every time)
    batch_size: int = 0  # 0 = data.batch_size
    seed: int = 1234  # fixes the (S, T) draws, so evaluations are comparable across steps and runs
    mlm_ratio: float = 0.15
    infill_ratio: float = 0.25  # length of the infilled middle, as a fraction of the window
    plot: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_name: str = "run"
    run_dir: str | None = None  # default: runs/slurm-<SLURM_JOB_ID>, else runs/<run_name>
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any; never; or a checkpoint path
    vae: VAEExperiment | None = None  # set by experiment=vae_digits: the BigLearn-VAE run of bench/vae.py


def _check(condition: bool, key: str, message: str, value) -> None:
    if not condition:
        raise UserError(f"{key} {message}; got {value!r}")


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


def validate(config: TrainConfig) -> TrainConfig:
    """Checks across fields that the dataclasses cannot express; UserError names the key."""
    for key, value in non_finite_numbers(config):  # e.g. model.init_std=inf would pass every range check below
        _check(False, key, "must be a finite number", value)
    objectives.validate(config.objective)
    if config.vae is not None:
        validate_vae(config.vae)
    d, ds, t, e = config.data, config.deepspeed, config.trainer, config.eval
    _check(d.kind in DATA_KINDS, "data.kind", f"must be one of {DATA_KINDS}", d.kind)
    if d.kind == "manifest" and not d.sources:
        _check(bool(d.manifest), "data.manifest", "must name a manifest file when data.kind=manifest", d.manifest)
    for i, source in enumerate(d.sources):
        _check(source.weight >= 0, f"data.sources[{i}].weight", "must be >= 0", source.weight)
    _check(d.demo_max_files >= 0, "data.demo_max_files", "must be >= 0 (0 = every file)", d.demo_max_files)
    for key in ("batch_size", "demo_vocab_size", "demo_seq_len"):
        _check(getattr(d, key) >= 1, f"data.{key}", "must be >= 1", getattr(d, key))
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
    _check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3", ds.zero_stage)
    _check(ds.precision in PRECISIONS, "deepspeed.precision", f"must be one of {PRECISIONS}", ds.precision)
    _check(ds.accelerator in ACCELERATORS, "deepspeed.accelerator", f"must be one of {ACCELERATORS}", ds.accelerator)
    _check(not ds.offload_param or ds.zero_stage == 3, "deepspeed.offload_param", "needs deepspeed.zero_stage=3", ds.offload_param)
    _check(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1",
           ds.offload_optimizer)
    for key in ("max_steps", "warmup_steps", "grad_accum", "log_every", "keep_last", "max_bad_steps"):
        _check(getattr(t, key) >= 1, f"trainer.{key}", "must be >= 1", getattr(t, key))
    _check(ds.dist_timeout_s > 0, "deepspeed.dist_timeout_s", "must be > 0 (seconds)", ds.dist_timeout_s)
    for key in ("eval_every", "save_every", "max_minutes", "grad_clip", "weight_decay", "peak_tflops"):
        _check(getattr(t, key) >= 0, f"trainer.{key}", "must be >= 0", getattr(t, key))
    for name in t.loggers:
        _check(name in LOGGERS, "trainer.loggers", f"entries must be among {list(LOGGERS)}", name)
    _check("jsonl" in t.loggers, "trainer.loggers", "must include jsonl (plots and resume checks read metrics.jsonl)",
           t.loggers)
    _check(math.isfinite(t.lr) and t.lr > 0, "trainer.lr", "must be a positive number", t.lr)
    _check(0 <= t.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]", t.min_lr_ratio)
    for key in ("beta1", "beta2"):
        _check(0 <= getattr(t, key) < 1, f"trainer.{key}", "must be in [0, 1)", getattr(t, key))
    for task in e.tasks:
        _check(task in EVAL_TASKS, "eval.tasks", f"entries must be among {EVAL_TASKS}", task)
    _check(e.batches >= 1, "eval.batches", "must be >= 1", e.batches)
    _check(e.batch_size >= 0, "eval.batch_size", "must be >= 0 (0 = data.batch_size)", e.batch_size)
    _check(0 < e.mlm_ratio <= 1, "eval.mlm_ratio", "must be in (0, 1]", e.mlm_ratio)
    _check(0 < e.infill_ratio < 1, "eval.infill_ratio", "must be in (0, 1)", e.infill_ratio)
    _check(config.resume != "", "resume", "must be 'auto', 'never' or a checkpoint path", config.resume)
    _check(bool(config.run_name) and "/" not in config.run_name, "run_name", "must be a non-empty name without '/'",
           config.run_name)
    return config


def schema(cls=TrainConfig) -> DictConfig:
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


def to_schema(tree: DictConfig | dict, cls=TrainConfig):
    """Merge a composed config tree into the schema `cls` and validate. ValueError names the key."""
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
    except ValueError as err:  # a schema's own __post_init__ (ModelConfig's): omegaconf wraps only TypeError
        raise UserError(str(err)) from None
    if not isinstance(config, TrainConfig):
        return config
    try:
        return validate(config)
    except ValueError as err:  # the model's and objectives' own checks name the key too
        raise UserError(str(err)) from None


def expected_type(key: str, cls=TrainConfig) -> str | None:
    """The schema type of a dotted key ("trainer.max_steps" -> "int"), None if unknown."""
    node = cls
    for part in key.split("."):
        hints = typing.get_type_hints(node) if is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
    text = re.sub(r"typing\.|builtins\.|<class '(\w+)'>", r"\1", str(node))
    return text.replace("NoneType", "null").replace(" | ", " or ")


def _config_error(err: OmegaConfBaseException, cls=TrainConfig) -> UserError:
    """One line naming the key, the value and, for a type mismatch, the expected type."""
    key = getattr(err, "full_key", None) or "?"
    value = getattr(err, "value", None)
    first_line = str(err).splitlines()[0]
    wanted = expected_type(key, cls) if "convert" in first_line or "type" in first_line else None
    if wanted is not None:
        return UserError(f"config key {key}={value!r}: expected {wanted}")
    return UserError(f"config key {key}: {first_line}")


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | str = CONFIG_DIR,
            config_name: str = "train", cls=TrainConfig) -> DictConfig:
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


def load_config(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | str = CONFIG_DIR) -> TrainConfig:
    return to_schema(compose(overrides, config_dir))


def resolve_run_dir(config: TrainConfig, environ=os.environ) -> Path:
    """run_dir when given, else runs/slurm-<job id> under SLURM (a requeued job keeps its id, so it
    resumes in place), else runs/<run_name>. Never time-based: every rank must derive the same path."""
    if config.run_dir:
        return Path(config.run_dir)
    if environ.get("SLURM_JOB_ID"):
        return Path("runs") / f"slurm-{environ['SLURM_JOB_ID']}"
    return Path("runs") / config.run_name


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def available_options(config_dir: Path | str = CONFIG_DIR) -> dict[str, list[str]]:
    """{group: [option, ...]} for --help."""
    root = Path(config_dir)
    return {group: sorted(p.stem for p in (root / group).glob("*.yaml")) for group in GROUPS if (root / group).is_dir()}
