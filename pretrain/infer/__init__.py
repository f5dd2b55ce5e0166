"""Inference with a big-learned model: exact scoring, any-order decoding, classification.

    scoring         log p(x_T | x_S) for one prediction order (one forward pass), and over orders
    decoding        sample x_T ~ p(x_T | x_S) one target at a time, with a key/value cache
    speculative     the same samples with several targets per pass (drafted, then judged exactly)
    sampling        a token from a row of logits: temperature, top-k, top-p
    classification  p(y | x) from a fine-tuned model's label slot; how examples become samples
    text            TextModel: strings in, strings out (generate, fill, score)
    cli             `python -m pretrain.infer {score,complete,classify}` (also `biglearn score` ...)

Fine-tuning imports this package, never the reverse.
"""
from .classification import (Example, ExampleFields, LabelLayout, classification_metrics, classify,
                             evaluate_classifier, read_examples)
from .cli import main, parse_positions
from .decoding import STRATEGIES, Completion, complete
from .sampling import sample_from_logits
from .scoring import label_log_probs, score, score_orders, split_spec
from .text import Filled, TextModel, gapped_ids, insert_gaps, parse_gaps

__all__ = ["Completion", "Example", "ExampleFields", "Filled", "LabelLayout", "STRATEGIES", "TextModel",
           "classification_metrics", "classify", "complete", "evaluate_classifier", "gapped_ids", "insert_gaps",
           "label_log_probs", "main", "parse_gaps", "parse_positions", "read_examples",
           "sample_from_logits", "score", "score_orders", "split_spec"]
