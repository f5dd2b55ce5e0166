"""Classification fine-tuning on the Trainer, plain FT or big-learn ("Big Learning", fine-tuning).

    config   FinetuneConfig (configs/finetune.yaml): data, strategy, beta, the Trainer's knobs
    run      the example stream, the loss, the run and its sweeps; `biglearn finetune`

Imports training and inference, never the reverse.
"""
from .config import FinetuneConfig, FinetuneData, load_config, sweep_configs
from .run import main, run, summarize

__all__ = ["FinetuneConfig", "FinetuneData", "load_config", "main", "run", "summarize", "sweep_configs"]
