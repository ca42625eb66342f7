"""Random-vector controls matched to the persona vector in geometry and in effect.

A control answers "does a perturbation of the same size, in no particular direction, move
the eval as much?". It must therefore be the same *kind* of perturbation and the same *size*:

- geometry: :meth:`SteeringVector.rotated` applies one Haar-random rotation to every layer's
  vector, so per-layer norms and all cross-layer cosines are the persona's;
- effect: a rotated vector at the persona's dose still moves the model less or more than the
  persona does (measured on SmolLM2, layers 13-16, dose 0.076: next-token KL 0.22-0.32
  against the persona's 0.92), because the model is not isotropic. :func:`match_dose` scales
  each control's dose until its KL agrees with the persona's within ``tol``.

The effect is the next-token KL(steered || unsteered) at the assistant tag (the last prompt
position, where the vector was read), averaged over the shipped dilemma pool
(``generate.load_prompts("dilemmas")``): the prompts 02 steers and calibrates the dose on,
so the yardstick is the one the dose was chosen with. Not the vignettes: matching on the eval's
own prompts would tune the controls on the quantity they are compared on.

A band of ``n_controls`` rotations (each its own seed) gives the null distribution the
persona's eval is read against (:func:`steerheal_utils.stats.band_position`).

Example:
    >>> ref = tag_logprobs(model, tok, prompts)                                 # doctest: +SKIP
    >>> target = tag_kl(model, tok, prompts, sv, 0.076, ref=ref)                 # doctest: +SKIP
    >>> m = match_dose(lambda d: tag_kl(model, tok, prompts, sv.rotated(1), d, ref=ref), target, 0.076)  # doctest: +SKIP
    >>> m["dose"], m["kl"], m["matched"]                                         # doctest: +SKIP

Modules: :mod:`.effect` (the tag KL), :mod:`.matching` (:func:`match_dose`, :class:`KLMatcher`, the
band's seeds and names), :mod:`.cache` (:func:`band_matches`), :mod:`.band` (records, summary, table).
"""

from .band import band_summary, band_table, match_record
from .cache import band_matches
from .effect import kl_prompts, mean_kl, tag_kl, tag_logprobs
from .matching import KLMatcher, control_name, control_seeds, is_control_name, match_band, match_dose

__all__ = ["KLMatcher", "band_matches", "band_summary", "band_table", "control_name", "control_seeds",
           "is_control_name", "kl_prompts", "match_band", "match_dose", "match_record", "mean_kl", "tag_kl",
           "tag_logprobs"]
