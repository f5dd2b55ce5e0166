"""Training: the Trainer, and pretraining on it (docs/training.md).

    config       TrainConfig (composed of its components' configs) and `resolve`, where the data
                 decides the vocabulary, BOS id and segments
    composition  Hydra's compose API onto dataclass schemas, for every config-driven command
    engine       DeepSpeedConfig; the DeepSpeed engine (ZeRO, optimizer, schedule); LocalEngine
    trainer      TrainerConfig (the loop's knobs, declared once) and the Trainer
    task         pretraining as a Trainer task: loss wrapper, per-task statistics, FLOPs, MFU
    guard        the divergence guard
    metrics      metrics.jsonl and the TensorBoard / W&B / MLflow backends
    console      run logging, progress-bar-safe console output
    evaluate     EvalConfig and the evaluation matrix (`biglearn eval`)
    plots        loss curves and the matrix as a PNG
    run          `python -m pretrain.train`: pretraining from config to checkpoint and export
"""
