"""What a run leaves on disk, and how it is read back (docs/training.md, docs/hf.md).

    sharded   DeepSpeed's checkpoint tags: save, resume (also on another world size), consolidate;
              every pickle read weights-only
    export    the fp32 export format (model.safetensors + model_config.json + tokenizer + card),
              and starting a run from an export (model.init)
    card      the export's model card and the evaluation matrix's text format
    loading   a model for inference from an export, a run directory or a checkpoint
    rundir    the files of a run directory that several layers read (metrics.jsonl)

`biglearn export` is `python -m pretrain.checkpoint`. Imports the model, never the trainer:
inference reads what training wrote without importing it.
"""
