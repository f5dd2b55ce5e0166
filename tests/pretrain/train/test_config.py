"""Config composition and validation: every preset composes, errors name the offending key."""
from pathlib import Path

import numpy as np
import pytest

from pretrain.train.config import CONFIG_DIR, available_options, load_config, resolve_run_dir
from data_pipeline.errors import UserError
from pretrain.model import ModelConfig
from pretrain.objectives import PRESETS, ObjectiveConfig


def test_every_group_option_composes_into_the_schemas():
    options = available_options()
    assert set(options) == {"model", "objective", "data", "deepspeed", "trainer", "eval", "experiment"}
    assert {"tiny", "small", "base", "large"} <= set(options["model"])
    assert {"biglearn", "mlm", "clm", "plm", "span", "mixture"} <= set(options["objective"])
    assert {"zero1", "zero2", "zero3", "zero3_offload", "cpu"} <= set(options["deepspeed"])
    assert {"demo", "custom"} <= set(options["data"]) and "smoke" in options["experiment"]
    for group, names in options.items():
        for name in names:
            extra = ["data.manifest=/nonexistent/manifest.json"] if group == "data" or group == "experiment" else []
            config = load_config([f"{group}={name}", *extra])
            assert isinstance(config.model, ModelConfig) and isinstance(config.objective, ObjectiveConfig)
    for name in options["objective"]:  # a preset's own file, or a named mixture (e.g. generalist)
        assert load_config([f"objective={name}"]).objective.name == (name if name in PRESETS else "mixture")


def test_model_presets_have_the_advertised_sizes():
    """Parameter counts from the shapes (vocabulary 50k, tied embeddings), against the names."""
    def count(name):
        m = load_config([f"model={name}"]).model
        per_layer = (m.d_model * m.n_heads * m.head_dim * 2 + 2 * m.d_model * m.n_kv_heads * m.head_dim
                     + 3 * m.d_model * m.ffn_hidden + 2 * m.d_model)
        return m.n_layers * per_layer + 50_000 * m.d_model
    assert 100e6 < count("small") < 150e6
    assert 300e6 < count("base") < 400e6
    assert 1.1e9 < count("large") < 1.5e9


def test_overrides_reach_the_dataclasses_and_derived_fields_follow():
    config = load_config(["model.d_model=64", "model.n_heads=2", "trainer.lr=1e-3", "objective=mlm",
                          "objective.mlm.ratio=0.3", "deepspeed=zero3", "model.activation_checkpointing=true"])
    assert config.model.activation_checkpointing  # keys absent from the yaml files are overridable too
    assert config.model.d_model == 64 and config.model.n_kv_heads == 2
    assert config.model.ffn_hidden == 192  # SwiGLU default recomputed for the new width
    assert config.trainer.lr == 1e-3 and config.objective.mlm.ratio == 0.3 and config.deepspeed.zero_stage == 3


def test_smoke_experiment_is_small_and_short():
    config = load_config(["experiment=smoke"])
    assert config.run_name == "smoke" and config.trainer.max_steps <= 50 and config.model.d_model <= 128


@pytest.mark.parametrize("overrides, named", [
    (["model.d_modle=3"], "model.d_modle"),                 # mistyped key
    (["+trainer.learning_rate=3"], "learning_rate"),         # unknown key added on purpose
    (["model.d_model=abc"], "model.d_model"),                # wrong type
    (["trainer.max_steps=abc"], "config key trainer.max_steps='abc': expected int"),
    (["trainer.progress=maybe"], "config key trainer.progress='maybe': expected bool"),
    (["model.init_std=inf"], "model.init_std must be a finite number; got inf"),  # non-finite, anywhere
    (["trainer.eps=nan"], "trainer.eps must be a finite number; got nan"),
    (["eval.mlm_ratio=-inf"], "eval.mlm_ratio must be a finite number"),
    (["trainer.max_steps=1.5"], "trainer.max_steps"),
    (["objective.name=bert"], "objective.name"),             # bad objective name
    (["objective=bert"], "objective/bert"),                  # bad group option
    (["objective=mixture", "objective.mixture={mlm: 1, gpt: 1}"], "gpt"),
    (["model.n_heads=3"], "model.n_heads"),                  # ModelConfig's own validation
    (["model.streams=3"], "model.streams must be 1 or 2; got 3"),
    (["model.streams=0"], "model.streams must be 1 or 2; got 0"),
    (["trainer.lr=-1"], "trainer.lr"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.offload_param=true", "deepspeed.zero_stage=2"], "deepspeed.offload_param"),
    (["data=custom"], "data.manifest"),                      # required key left out
    (["eval.tasks=[joint,nope]"], "eval.tasks"),
])
def test_config_errors_name_the_key(overrides, named):
    """A UserError (the command lines print it as one line), also for the dataclasses' own
    checks, which omegaconf lets through unwrapped."""
    with pytest.raises(UserError) as error:
        load_config(overrides)
    assert named in str(error.value)


def test_unknown_key_inside_a_config_file_is_named(tmp_path):
    import shutil
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, root)
    (root / "trainer" / "default.yaml").write_text((root / "trainer" / "default.yaml").read_text() + "warmup: 10\n")
    with pytest.raises(ValueError, match="trainer.warmup"):
        load_config([], root)


def test_run_dir_is_explicit_else_slurm_job_else_run_name():
    config = load_config(["run_name=abc"])
    assert resolve_run_dir(config, environ={}) == Path("runs/abc")
    assert resolve_run_dir(config, environ={"SLURM_JOB_ID": "77"}) == Path("runs/slurm-77")
    config = load_config(["run_dir=/tmp/x", "run_name=abc"])
    assert resolve_run_dir(config, environ={"SLURM_JOB_ID": "77"}) == Path("/tmp/x")


def test_data_sources_and_segment_rules_come_from_overrides():
    config = load_config(["data=custom", "data.sources=[{manifest: a/manifest.json, weight: 3}, {manifest: b.json}]",
                          "objective.segments=[{p_source: 0.5, p_target: 0.5}, {}]"])
    assert [(s.manifest, s.weight) for s in config.data.sources] == [("a/manifest.json", 3.0), ("b.json", 1.0)]
    assert config.data.manifest is None and not config.data.allow_external_shards  # a mix needs no data.manifest
    assert [(r.p_source, r.p_target, r.p_drop) for r in config.objective.segments] == [(0.5, 0.5, 0.0), (0.0, 0.0, 0.0)]
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight"):
        load_config(["data.sources=[{manifest: a.json}, {manifest: b.json, weight: -1}]"])


def test_cfg_prints_the_vocabulary_the_run_takes_from_the_data(manifest, tmp_path, capsys):
    """--cfg shows model.vocab_size / bos_id as the run sets them from the data's tokenizer (the
    manifest, or for a demo not built yet data.demo_vocab_size), not the schema's 8000."""
    import yaml
    from data_pipeline import load_manifest

    from pretrain.train.run import main

    tokenizer = load_manifest(manifest)["tokenizer"]
    vocab = int(np.random.default_rng().integers(300, 4000))
    for overrides, expected in (
            (["data.kind=manifest", f"data.manifest={manifest}"], (tokenizer["vocab_size"], tokenizer["bos_id"])),
            (["data.kind=demo", f"data.demo_dir={tmp_path}", f"data.demo_vocab_size={vocab}"], (vocab, 2))):
        assert main([*overrides, "model.vocab_size=8000", "--cfg"]) == 0
        out = capsys.readouterr().out
        model = yaml.safe_load(out)["model"]
        assert (model["vocab_size"], model["bos_id"]) == expected
        note = out.splitlines()[0]
        assert note.startswith("#") and f"model.vocab_size: {expected[0]}" in note and "configured: 8000" in note
    assert not any(tmp_path.iterdir())  # --cfg builds nothing
