"""Big learning: one transformer p(x_T | x_S) over many (source, target) splits (docs/design.md).

Layers, each a subpackage (imports point one way; tests/test_imports.py checks the arrows):

    layout, objectives   the sorted layout and the (S, T) samplers (numpy only)
    model                BigLearner: config, transformer, ops, key/value cache, weights
    data                 streaming reader of the shards with an exact-resume cursor, mixing
    checkpoint           what a run leaves on disk: sharded checkpoints, exports, loading
    train                the Trainer and pretraining: config, engine, loop, evaluation
    infer                scoring, decoding, classification, TextModel
    finetune             classification fine-tuning on the Trainer
    hf                   Hugging Face conversion
    experiments          research code (synthetic sources, the demo, the VAE); never imported
                         by the library

One command line: `biglearn <command>` (pretrain.cli).
"""
