"""Text in, text out: the Python API over a tokenizer and a big-learned model.

    from pretrain.infer import TextModel
    lm = TextModel.load("runs/demo/export")            # the export carries its tokenizer
    lm.generate("def parse(", max_new_tokens=20)       # continuation, left to right
    lm.fill("Return the [___] of the [___:3].")        # any-order infilling of the gaps
    lm.score("Return the sum.")                        # exact log p(text), left to right

The gap syntax is the command line's (`[___]` = gap_len tokens, `[___:n]` = n tokens); both go
through `gapped_ids`, so `python -m pretrain.infer complete` and `TextModel.fill` read a text the
same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from data_pipeline.errors import UserError

from .decoding import complete
from .scoring import check_length, score

GAP = re.compile(r"\[_+(?::(\d+))?\]")


def _check_room(length: int, n: int, max_len: int | None, what: str) -> None:
    """UserError before `n` more positions are made when they would pass the model's max_len."""
    if max_len is not None and length + n > max_len:
        raise UserError(f"{what} makes the sequence at least {length + n} tokens long, longer than the model's "
                        f"maximum length max_seq_len={max_len}")


def parse_gaps(text: str, encode, gap_len: int, pad_id: int = 0, max_len: int | None = None):
    """Token ids and gap positions of `text` in which each `[___]` (or `[___:n]`) is a gap of
    gap_len (or n) tokens. `encode` maps a string to token ids. A text longer than `max_len`
    tokens is refused before its gaps are laid out."""
    ids, gaps, start = [], [], 0
    for match in GAP.finditer(text):
        ids += encode(text[start:match.start()]) if text[start:match.start()].strip() else []
        n = int(match.group(1)) if match.group(1) else gap_len
        if n < 1:
            raise UserError(f"gap {match.group(0)!r} must have length >= 1")
        _check_room(len(ids), n, max_len, f"gap {match.group(0)!r}")
        gaps += range(len(ids), len(ids) + n)
        ids += [pad_id] * n
        start = match.end()
    ids += encode(text[start:]) if text[start:].strip() else []
    return ids, gaps


def insert_gaps(ids, spec: str, pad_id: int = 0, max_len: int | None = None):
    """Insert gaps given as 'POS:LEN,...' (token offsets into ids) -> (ids, gap positions)."""
    ids, gaps, shift = list(ids), [], 0
    try:
        pairs = sorted((int(p), int(n)) for p, n in (item.split(":") for item in spec.split(",")))
    except ValueError:
        raise UserError(f"--gaps must look like 'POS:LEN,POS:LEN'; got {spec!r}") from None
    for pos, n in pairs:
        if not 0 <= pos <= len(ids) - shift or n < 1:
            raise UserError(f"--gaps {pos}:{n}: position must lie in [0, {len(ids) - shift}] and length be >= 1")
        _check_room(len(ids), n, max_len, f"--gaps {pos}:{n}")
        at = pos + shift
        ids[at:at] = [pad_id] * n
        gaps += range(at, at + n)
        shift += n
    return ids, gaps


def gap_runs(positions) -> list[list[int]]:
    """Positions to fill cut into gaps: runs of consecutive positions."""
    runs = np.split(np.asarray(positions, dtype=np.int64), np.flatnonzero(np.diff(positions) != 1) + 1)
    return [run.tolist() for run in runs if len(run)]


def gapped_ids(tokenizer, text: str, *, gap_len: int = 2, gaps: str | None = None, continue_n: int = 0,
               max_len: int | None = None):
    """(token ids, positions to fill) for a text with `[___]` gaps, explicit `gaps` 'POS:LEN,...'
    at token offsets, or `continue_n` tokens appended after it; refused before anything is laid
    out when it would pass `max_len` (the model's max_seq_len)."""
    pad = tokenizer.pad_id
    if gap_len < 1 or continue_n < 0:
        raise UserError(f"--gap-len must be >= 1 and --continue >= 0; got {gap_len}, {continue_n}")
    if continue_n:
        ids = tokenizer.encode(text) if text.strip() else []
        _check_room(len(ids), continue_n, max_len, f"--continue {continue_n}")
        positions = list(range(len(ids), len(ids) + continue_n))
        ids += [pad] * continue_n
    elif gaps:
        ids, positions = insert_gaps(tokenizer.encode(text), gaps, pad, max_len)
    else:
        ids, positions = parse_gaps(text, tokenizer.encode, gap_len, pad, max_len)
    if not positions:
        raise UserError("nothing to complete: mark gaps with [___] or [___:n], or pass --gaps / --continue")
    return ids, positions


@dataclass
class Filled:
    """One completion: the whole text, the text of each gap in order, and log p(filled | rest)."""
    text: str
    gaps: list[str]
    log_prob: float


class TextModel:
    """A model and its tokenizer; every method takes and returns strings (module docstring)."""

    def __init__(self, model, tokenizer):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                            f"({model.config.vocab_size})")
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, model_path, tokenizer=None, device: str = "cpu", trust_checkpoint: bool = False) -> "TextModel":
        """From an export or a run directory holding one (a training run's export/, a fine-tuning
        run's model/), with the tokenizer it carries unless `tokenizer` names one (our directory,
        an HF tokenizer.json or a sentencepiece .model); with trust_checkpoint, a run directory's
        newest checkpoint and the run's dataset tokenizer."""
        from ..checkpoint.loading import load_with_tokenizer

        model, _, loaded = load_with_tokenizer(model_path, device, tokenizer, trust_checkpoint)
        if loaded is None:
            raise UserError(f"{model_path} carries no tokenizer: pass tokenizer=PATH")
        return cls(model, loaded)

    def _complete(self, ids, positions, n: int, **sampling) -> list[Filled]:
        check_length(self.model, len(ids))
        source = [p for p in range(len(ids)) if p not in set(positions)]
        tokens = np.asarray([ids] * n)
        result = complete(self.model, tokens, [source] * n, [positions] * n, pad_id=self.tokenizer.pad_id, **sampling)
        out = []
        runs = gap_runs(positions)
        for row, log_prob in zip(result.tokens, result.log_probs):
            out.append(Filled(text=self.tokenizer.decode(row), gaps=[self.tokenizer.decode(row[r]) for r in runs],
                              log_prob=float(log_prob)))
        return out

    def fill(self, text: str, *, gap_len: int = 2, strategy: str = "left_to_right", num_samples: int = 1,
             **sampling) -> Filled | list[Filled]:
        """Fill every `[___]` / `[___:n]` gap of `text` given the rest (any strategy of
        pretrain.infer.STRATEGIES; temperature, top_k, top_p, seed ...). One Filled, or a list
        of num_samples."""
        ids, positions = gapped_ids(self.tokenizer, text, gap_len=gap_len, max_len=self.model.config.max_seq_len)
        out = self._complete(ids, positions, num_samples, strategy=strategy, **sampling)
        return out[0] if num_samples == 1 else out

    def generate(self, prompt: str, max_new_tokens: int = 32, **sampling) -> str:
        """The text that follows `prompt`, `max_new_tokens` tokens decoded left to right."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        ids, positions = gapped_ids(self.tokenizer, prompt, continue_n=max_new_tokens,
                                    max_len=self.model.config.max_seq_len)
        return self._complete(ids, positions, 1, strategy="left_to_right", **sampling)[0].gaps[0]

    def score(self, text: str, given: str | None = None) -> float:
        """Exact log p(text) in nats, predicted left to right; with `given`, log p(text | given)
        for `given` placed before `text` as the source."""
        context = self.tokenizer.encode(given) if given else []
        ids = context + self.tokenizer.encode(text)
        if len(ids) == len(context):
            raise UserError("the text to score is empty")
        check_length(self.model, len(ids))
        return float(score(self.model, np.asarray(ids), list(range(len(context))),
                           list(range(len(context), len(ids))), pad_id=self.tokenizer.pad_id))
