import json

import numpy as np
import pytest
import torch

from pretrain.layout import collate
from data_pipeline.errors import UserError
from pretrain.checkpoint.export import CONFIG, export_model, load_exported
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveSampler


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip_gives_identical_logits(tmp_path, tie):
    rng = np.random.default_rng()
    model = BigLearner(ModelConfig(vocab_size=41, d_model=32, n_layers=2, n_heads=4, tie_embeddings=tie,
                                   attention_backend="torch")).eval()
    export_model(model, tmp_path, {"tokenizer_sha256": "feed"})
    loaded, meta = load_exported(tmp_path)
    assert meta["tokenizer_sha256"] == "feed" and meta["model"]["vocab_size"] == 41
    batch = collate(rng.integers(0, 41, (2, 12)), [ObjectiveSampler("biglearn")(12, rng) for _ in range(2)], 0).to_torch()
    torch.testing.assert_close(loaded(batch), model(batch))


def test_loading_something_else_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="not an exported model"):
        load_exported(tmp_path)


@pytest.mark.parametrize("streams", [1, 2])
def test_weights_of_the_other_stream_mode_fail_in_one_line_naming_the_file(tmp_path, streams):
    """An export whose model_config.json says the other model.streams than its weights (saved
    in one mode, loaded in the other without conversion)."""
    model = BigLearner(ModelConfig(vocab_size=41, d_model=32, n_layers=1, n_heads=4, streams=streams))
    export_model(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG).read_text())
    meta["model"]["streams"] = 3 - streams
    (tmp_path / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"model.safetensors: checkpoint weights are for model.streams={streams} "):
        load_exported(tmp_path)
