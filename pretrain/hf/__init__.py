"""Hugging Face in and out (docs/hf.md): Llama-family checkpoints to our export and back.

    convert   `biglearn convert {from-hf,to-hf}` (also `python -m pretrain.hf`)
"""
