"""The demo's final report: numbers and examples a person can judge, against two baselines.

- held-out infilling: top-1 accuracy of each middle token given the prefix, the suffix and the
  middle tokens before it (the validation matrix's `infill` draws), for the trained model, the
  same model untrained, and a unigram model (always the most frequent training token);
- held-out left-to-right NLL per token: trained, untrained, unigram (training-token frequencies,
  add-one smoothed);
- three held-out windows with a span masked and filled by the trained model (greedy);
- log p of a held-out sentence and of the same tokens scrambled.
"""
from __future__ import annotations

import numpy as np
import torch

from ..layout import TaskBatch


def unigram_log_probs(manifest, vocab_size: int, n_batches: int = 32, batch_size: int = 16) -> np.ndarray:
    """log p(token) from the first n_batches x batch_size training windows, add-one smoothed."""
    from ..train.evaluate import validation_windows

    counts = np.ones(vocab_size)
    for batch in validation_windows(manifest, n_batches, batch_size, split="train"):
        for window in batch:
            np.add.at(counts, window, 1)
    return np.log(counts / counts.sum())


@torch.no_grad()
def infill_accuracy(model, batches: list[TaskBatch]) -> float:
    """Top-1 accuracy of the model's prediction of every target token (teacher forcing)."""
    right = total = 0
    for batch in batches:
        batch = batch.to_torch(torch.device("cpu"))
        mask = batch.target_mask
        right += int((model(batch)[mask].argmax(-1) == batch.labels[mask]).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def unigram_scores(log_unigram: np.ndarray, infill: list[TaskBatch], left_to_right: list[TaskBatch]) -> dict:
    """The unigram model's infill top-1 accuracy and left-to-right NLL per token."""
    infill_labels = np.concatenate([b.labels[b.target_mask] for b in infill])
    l2r_labels = np.concatenate([b.labels[b.target_mask] for b in left_to_right])
    return {"infill_top1": float((infill_labels == log_unigram.argmax()).mean()),
            "left_to_right_nll": float(-log_unigram[l2r_labels].mean())}


def examples(model, tokenizer, windows: list[np.ndarray], span: int = 3, context: int = 24) -> tuple[list, tuple]:
    """Three (masked text, filled span, true span) from held-out windows, and (sentence,
    log p, scrambled sentence, log p) for the first one."""
    from ..infer import complete, score

    fills = []
    for window in windows[:3]:
        ids = np.asarray(window[:context])
        start = len(ids) // 2
        targets = list(range(start, start + span))
        source = [p for p in range(len(ids)) if p not in targets]
        filled = complete(model, ids[None], [source], [targets], temperature=0.0, pad_id=tokenizer.pad_id)
        masked = tokenizer.decode(ids[:start]) + " [___] " + tokenizer.decode(ids[start + span:])
        fills.append((masked, tokenizer.decode(filled.tokens[0][targets]), tokenizer.decode(ids[targets])))
    sentence = np.asarray(windows[0][:16])
    scrambled = np.random.default_rng(0).permutation(sentence)
    every = list(range(len(sentence)))
    scores = [float(score(model, s, [], every, pad_id=tokenizer.pad_id)) for s in (sentence, scrambled)]
    return fills, (tokenizer.decode(sentence), scores[0], tokenizer.decode(scrambled), scores[1])


def report(trained, untrained, batches: dict, matrix: dict, baseline: dict, manifest, tokenizer) -> tuple[str, dict]:
    """The report's text and its numbers ({"infill_top1": {...}, "left_to_right_nll": {...},
    "sentence_log_p": {"original", "scrambled"}})."""
    log_unigram = unigram_log_probs(manifest, trained.config.vocab_size)
    uni = unigram_scores(log_unigram, batches["infill"], batches["left_to_right"])
    numbers = {"infill_top1": {"trained": infill_accuracy(trained, batches["infill"]),
                               "untrained": infill_accuracy(untrained, batches["infill"]),
                               "unigram": uni["infill_top1"]},
               "left_to_right_nll": {"trained": matrix["left_to_right"]["nll"],
                                     "untrained": baseline["left_to_right"]["nll"],
                                     "unigram": uni["left_to_right_nll"]}}
    first = batches["left_to_right"][0]
    windows = [first.labels[i, :first.n_target[i]] for i in range(first.batch_size)]
    fills, (sentence, logp, scrambled, logp_scrambled) = examples(trained, tokenizer, windows)
    numbers["sentence_log_p"] = {"original": logp, "scrambled": logp_scrambled}
    acc, nll = numbers["infill_top1"], numbers["left_to_right_nll"]
    lines = ["held-out infilling and left-to-right NLL (higher accuracy / lower NLL is better):",
             f"  {'':<10}{'infill top-1':>14}{'L2R NLL/token':>16}"]
    lines += [f"  {name:<10}{acc[name]:>14.1%}{nll[name]:>16.3f}" for name in ("trained", "untrained", "unigram")]
    lines.append("\nheld-out text, a span masked and filled by the trained model (greedy):")
    for masked, filled, truth in fills:
        lines.append(f"  {masked!r}\n      filled {filled!r}   truth {truth!r}")
    lines.append(f"\nlog p of a held-out sentence vs the same tokens scrambled (nats, higher = more likely):\n"
                 f"  {logp:9.1f}  {sentence!r}\n  {logp_scrambled:9.1f}  {scrambled!r}")
    return "\n".join(lines), numbers
