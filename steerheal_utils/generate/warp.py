"""Temperature, top-k and top-p in one logits processor that never sorts the vocabulary.

transformers applies temperature, top-k and top-p as three warpers; its top-p sorts the whole
vocabulary every decode step (262k entries for gemma-3), although after top-k only ``k``
candidates can survive. Here top-p runs on the ``k`` survivors only: one ``topk`` (partial
selection), a softmax and a cumulative sum over ``k`` values, and one scatter back. The kept set
and the kept scores are those of transformers' three warpers in that order, so sampling from the
result draws the same tokens with the same random state (tokens tied with the k-th score are the
one difference: transformers keeps every tie, this keeps exactly k).

Measured with ``python scripts/sampler_bench.py`` (one decode step's warping, batch x vocab): see
the README's GPU section for the figures and the command.
"""

import torch


class TopKTopP:
    """A transformers logits processor: ``scores / temperature``, then top-k, then top-p.

    Pass it as ``logits_processor=[TopKTopP(...)]`` with ``temperature=1.0, top_k=0, top_p=1.0``
    in ``generate`` (so transformers adds none of its own warpers).

    Args:
        temperature: > 0.
        top_k: candidates kept before top-p (>= 1); ``0`` means the whole vocabulary (then this
            sorts it, like transformers).
        top_p: the smallest set of the top candidates whose probability (renormalised over the
            top-k) reaches ``top_p`` is kept; ``1.0`` keeps all ``k``.

    Example:
        >>> warp = TopKTopP(temperature=0.7, top_k=64, top_p=0.95)
        >>> model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        ...                logits_processor=[warp])  # doctest: +SKIP
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        k = min(self.top_k or scores.shape[-1], scores.shape[-1])
        vals, idx = torch.topk(scores, k, dim=-1)  # descending
        if self.top_p < 1.0:
            probs = vals.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the candidates ranked above each one
            # transformers drops a token when the ascending cumulative mass up to it is <= 1 - top_p,
            # i.e. when the mass strictly above it is >= top_p; the first token always stays
            drop = before >= self.top_p
            drop[..., 0] = False
            vals = vals.masked_fill(drop, -float("inf"))
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(-1, idx, vals)


def generate_kwargs(temperature: float, top_k: int, top_p: float) -> dict:
    """``generate`` keywords that sample with :class:`TopKTopP` (temperature > 0) or greedily (0)."""
    if temperature <= 0:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                logits_processor=[TopKTopP(temperature, top_k, top_p)])
