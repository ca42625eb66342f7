"""The band's matched doses saved next to the eval cache, reused when their fingerprint matches."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..runfolder import atomic_write_json, read_cached
from ..vector.value import SteeringVector
from .matching import KLMatcher


def band_matches(path, fingerprint: str, matcher: Callable[[], KLMatcher], band: Sequence[tuple[str, SteeringVector]]) -> dict:
    """Every band member's :func:`match_dose` result (name -> dict), matched in band order.

    Read from ``path`` (JSON) when its ``fingerprint`` matches, else computed with a fresh
    ``matcher()`` and written there atomically. All members are matched in one pass, so the
    warm starts of :meth:`KLMatcher.match` (and therefore each matched dose) are the same
    whether or not an earlier attempt crashed half-way through the band.
    """
    path = Path(path)
    doc = read_cached(path, fingerprint, ("matches",))
    if doc is not None and isinstance(doc["matches"], dict) and set(doc["matches"]) >= {n for n, _ in band}:
        return doc["matches"]
    m = matcher()
    out = {name: {**m.match(vec), "seed": vec.meta.get("control_seed")} for name, vec in band}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"fingerprint": fingerprint, "persona_tag_kl": m.target, "matches": out})
    return out
