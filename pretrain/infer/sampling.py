"""How a token is drawn from a row of logits: temperature, top-k and top-p filtering, and
inverse-CDF draws; shared by every decoding strategy (pretrain/infer/decoding.py) and by
speculative decoding, which needs the filtered distribution itself, not only a draw from it
(pretrain/infer/speculative.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from data_pipeline.errors import UserError


def filtered_weights(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Unnormalised probabilities [..., V] of softmax(logits / temperature) restricted to the top_k
    tokens (0 = all) and to the smallest set of mass >= top_p; the top token has weight 1.
    temperature > 0 (temperature 0 is the argmax: `Sampling.probs`)."""
    # Shifted so that the top logit is 0 BEFORE dividing: a tiny temperature then sends the others
    # to -inf and leaves the top one at 0, where (logits / T) - max overflowed to -inf - (-inf) = NaN.
    # T is held above the smallest normal number of the dtype, where it would round to 0 (0 / 0).
    logits = _at_least_float32(logits)
    logits = logits - logits.amax(-1, keepdim=True)
    if temperature != 1:
        logits.div_(max(temperature, torch.finfo(logits.dtype).tiny))  # in place: the shift made a copy
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, index = logits.sort(-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -math.inf)  # keeps the top token
        logits = torch.full_like(logits, -math.inf).scatter(-1, index, sorted_logits)
    return logits.exp()


def sample_from_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None):
    """One token per row of logits [..., V]: greedy when temperature == 0, else softmax(logits /
    temperature) restricted to the top_k tokens (0 = all) and the smallest set of mass >= top_p."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return logits.argmax(-1)
    return inverse_cdf(filtered_weights(logits, temperature=temperature, top_k=top_k, top_p=top_p), generator)


def inverse_cdf(weights, generator):
    """One token per row of unnormalised probabilities weights [..., V], by inverse-CDF sampling with
    one uniform per row: the same distribution as torch.multinomial, which took ~25x longer on CPU
    over an 8000-token vocabulary (bench/decode.py). u < total, so the clamp only guards rounding;
    a zero-probability token adds no width to the CDF. Speculative decoding draws by the same rule
    on the host (speculative.inverse_cdf)."""
    cdf = weights.reshape(-1, weights.shape[-1]).cumsum(-1)
    u = torch.rand(len(cdf), 1, generator=generator, dtype=cdf.dtype).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).reshape(weights.shape[:-1])


def _at_least_float32(x):
    """Softmax work in the model's own precision, fp16/bf16 widened: float64 exp/log over a
    vocabulary of 8000 took 8x as long as float32 on CPU, a quarter of a decoding step
    (bench/decode.py), for differences far below sampling noise."""
    return x.float() if x.element_size() < 4 else x


@dataclass
class Sampling:
    """How one token is drawn from a row of logits, shared by every strategy."""
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator
    allowed: torch.Tensor | None  # bool [V] or None

    @property
    def unfiltered(self) -> bool:
        return self.temperature == 1 and not self.top_k and self.top_p == 1

    def log_probs(self, logits):
        """The model's log-probabilities (float32 or wider), renormalised over the allowed tokens."""
        logits = _at_least_float32(logits)
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, -math.inf)
        return logits.log_softmax(-1)

    def draw(self, log_probs):
        """One token per row of `log_probs` (log_probs' result)."""
        if self.unfiltered:  # already normalised: exp is safe
            return inverse_cdf(log_probs.exp(), self.generator)
        return sample_from_logits(log_probs, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  generator=self.generator)

    def probs(self, log_probs):
        """The distribution `draw` samples from, normalised [..., V]: the filtered softmax, or for
        temperature 0 all the mass on the argmax (the token `draw` returns)."""
        if self.temperature == 0:
            return torch.zeros_like(log_probs).scatter_(-1, log_probs.argmax(-1, keepdim=True), 1.0)
        if self.unfiltered:
            return log_probs.exp()
        weights = filtered_weights(log_probs, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return weights / weights.sum(-1, keepdim=True)
