"""Group-causal two-stream attention (docs/design.md, "Visibility rule"). Imports nothing from the project."""
from .dispatch import check_attention_inputs, group_attention, two_stream_attention
from .reference import INVALID_GROUP, attention_plan, planned_attention, reference_attention, visibility

__all__ = ["INVALID_GROUP", "visibility", "group_attention", "two_stream_attention",
           "reference_attention", "check_attention_inputs", "attention_plan", "planned_attention"]
