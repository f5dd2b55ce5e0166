"""Classification from the label slot: p(y | x) with S = the sample, T = {label slot}.

A sample X = (y, x) holds its label in a slot (position 0) as one of the tokenizer's sentinel
tokens ("Big Learning", fine-tuning section): classification is then the (S, T) draw that
predicts that slot from everything else. `LabelLayout` says how examples become samples and is
stored in a fine-tuned model's metadata, so inference encodes them the same way.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import UserError, one_line

from ..layout import collate
from .scoring import check_length, eval_forward, split_spec


@torch.no_grad()
def classify(model, samples, label_position, label_token_ids, *, pad_id: int = 0, segments=None):
    """p(y | x) from the label slot: S = every other position of the sample, T = {label slot}.

    samples: token sequences (lengths may differ; the label slot's content is ignored);
    label_position: one int for all or one per sample; label_token_ids: the C label tokens.
    segments: per-sample segment ids, for a model pretrained on multi-segment data.
    Returns probabilities [B, C] renormalised over the label tokens, and the model's total mass
    on them [B] (near 1 for a model trained with the label slot).
    """
    samples = [np.asarray(s, dtype=np.int64).reshape(-1) for s in samples]
    if not samples or min(len(s) for s in samples) < 2:
        raise UserError("classify needs at least one sample, each with a label slot and >= 1 other token")
    positions = np.broadcast_to(np.asarray(label_position, dtype=np.int64), (len(samples),))
    label_ids = torch.as_tensor(np.asarray(label_token_ids, dtype=np.int64))
    if label_ids.numel() < 2 or int(label_ids.min()) < 0 or int(label_ids.max()) >= model.config.vocab_size:
        raise UserError(f"label_token_ids must name >= 2 tokens in [0, {model.config.vocab_size}); got {label_ids.tolist()}")
    for s in samples:
        check_length(model, len(s))
    specs = [split_spec(len(s), np.setdiff1d(np.arange(len(s)), [p]), [p]) for s, p in zip(samples, positions)]
    device = next(model.parameters()).device
    logits = eval_forward(model, collate(samples, specs, pad_id, segments=segments).to_torch(device))[:, 0].double()
    log_probs = logits.log_softmax(-1)[:, label_ids.to(device)]
    return log_probs.softmax(-1).cpu(), log_probs.exp().sum(-1).cpu()



@dataclass
class Example:
    text: str
    text_pair: str | None
    label: str | None


@dataclass
class LabelLayout:
    """How an example becomes a sample; stored in the exported model's metadata."""
    labels: list[str]
    label_token_ids: list[int]
    separator_id: int
    max_len: int

    @classmethod
    def from_tokenizer(cls, tokenizer, labels: list[str], max_len: int) -> "LabelLayout":
        if len(labels) < 2:
            raise ValueError(f"classification needs at least 2 labels; got {labels}")
        if len(labels) + 1 > len(tokenizer.sentinel_ids):
            raise ValueError(f"{len(labels)} labels and a separator need {len(labels) + 1} sentinel tokens; the "
                             f"tokenizer has {len(tokenizer.sentinel_ids)} (train it with more n_sentinels)")
        return cls(list(labels), list(tokenizer.sentinel_ids[:len(labels)]), tokenizer.sentinel_ids[len(labels)], max_len)

    def encode(self, tokenizer, text: str, text_pair: str | None = None, label: str | None = None) -> np.ndarray:
        ids = tokenizer.encode(text)
        if text_pair is not None:
            ids = ids + [self.separator_id] + tokenizer.encode(text_pair)
        slot = self.label_token_ids[self.labels.index(label)] if label is not None else tokenizer.pad_id
        return np.asarray([slot] + ids[:self.max_len - 1], dtype=np.int64)


@dataclass
class ExampleFields:
    """Where an example's parts are: JSONL keys, or the TSV header's column names."""
    text_field: str = "text"
    pair_field: str = "text_pair"  # second sentence of a pair task (optional column)
    label_field: str = "label"


def read_examples(path, layout_or_fields=None, require_labels: bool = True) -> list[Example]:
    """Examples of a JSONL or TSV (header row naming the columns) file. `layout_or_fields`: field
    names (ExampleFields or any config with the same attributes), or a LabelLayout (default field
    names, labels checked against it)."""
    path = Path(path)
    is_layout = isinstance(layout_or_fields, LabelLayout)
    fields = ExampleFields() if layout_or_fields is None or is_layout else layout_or_fields
    known = layout_or_fields.labels if is_layout else None
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix not in (".jsonl", ".tsv", ".txt"):
        raise ValueError(f"{path}: expected a .jsonl or .tsv file")
    try:
        records = _records(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read it ({one_line(err)})") from None
    examples = []
    for line, record in records:
        text = record.get(fields.text_field)
        if text is None or not str(text).strip():
            raise ValueError(f"{path}:{line}: empty or missing text field {fields.text_field!r}")
        label = record.get(fields.label_field)
        label = None if label is None or str(label) == "" else str(label)
        if label is None and require_labels:
            raise ValueError(f"{path}:{line}: missing label field {fields.label_field!r}")
        if label is not None and known is not None and label not in known:
            raise ValueError(f"{path}:{line}: unknown label {label!r}; known labels are {known}")
        pair = record.get(fields.pair_field)
        examples.append(Example(str(text), None if pair in (None, "") else str(pair), label))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file, or of a TSV file whose header row names the columns."""
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
        for number, record in records:
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
        return records
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(i + 2, row) for i, row in enumerate(reader)]


def classification_metrics(predicted: np.ndarray, gold: np.ndarray, n_labels: int) -> dict:
    """Accuracy and F1: of label 1 for two labels (GLUE MRPC style), else macro-F1."""
    f1s = []
    for c in range(n_labels):
        tp = np.sum((predicted == c) & (gold == c))
        denominator = np.sum(predicted == c) + np.sum(gold == c)
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": float(np.mean(predicted == gold)), "f1": float(f1s[1] if n_labels == 2 else np.mean(f1s))}


def evaluate_classifier(model, samples: list[np.ndarray], labels: np.ndarray, layout: LabelLayout, pad_id: int,
                        batch_size: int = 64) -> dict:
    """Accuracy and F1 of the label-slot prediction on encoded `samples` with gold `labels`."""
    predicted = []
    for start in range(0, len(samples), batch_size):
        probs, _ = classify(model, samples[start:start + batch_size], 0, layout.label_token_ids, pad_id=pad_id)
        predicted.append(probs.argmax(-1).numpy())
    return classification_metrics(np.concatenate(predicted), labels, len(layout.labels))
