"""Group-causal two-stream attention (docs/design.md, "Visibility rule").

The top-level folder `kernels/` holds this package under its own import name, `biglearn_kernels`:
the name `kernels` belongs to Hugging Face's distribution of that name (a dependency of
transformers), and the folder has no __init__.py, so it can never shadow that package.
Imports nothing from the project.
"""
from .dispatch import BACKENDS, check_attention_inputs, group_attention, two_stream_attention
from .reference import INVALID_GROUP, attention_plan, planned_attention, reference_attention, visibility

__all__ = ["BACKENDS", "INVALID_GROUP", "visibility", "group_attention", "two_stream_attention",
           "reference_attention", "check_attention_inputs", "attention_plan", "planned_attention"]
