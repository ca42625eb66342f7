"""JupyterLab: browse the scored rows of 03 by reason (an ipywidgets view; nothing runs until used)."""

from __future__ import annotations

import html
from typing import Any, Sequence

from ..figstatic import browser_static
from .gates import GATES
from .rows import reason_counts


def browser(rows: Sequence[dict[str, Any]]) -> Any:
    """JupyterLab: browse rows by reason, one at a time, with every score. ``None`` without ipywidgets."""
    try:
        import ipywidgets as W
    except ImportError:
        return None

    rows = list(rows)
    reasons = ["all", *reason_counts(rows)]
    pick = W.Dropdown(options=reasons, description="reason")
    idx = W.IntSlider(min=0, max=max(0, len(rows) - 1), description="row")
    view = W.HTML()

    def sel() -> list[dict[str, Any]]:
        return rows if pick.value == "all" else [r for r in rows if r["reason"] == pick.value]

    def show(_=None) -> None:
        s = sel()
        idx.max = max(0, len(s) - 1)
        if not s:
            view.value = "<i>no rows</i>"
            return
        r = s[min(idx.value, len(s) - 1)]
        scores = ", ".join(f"{k}={r[k]:.3g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                           for k, *_ in GATES if k in r)
        view.value = (f"<b>{html.escape(str(r.get('id', '')))}</b> &middot; <b>{html.escape(r['reason'])}</b>"
                      f"<br><i>{html.escape(r.get('prompt', ''))}</i>"
                      f"<div style='white-space:pre-wrap;margin:6px 0'>{html.escape(r['completion'])}</div>"
                      f"<small>{html.escape(scores)}</small>")

    pick.observe(lambda _: (setattr(idx, "value", 0), show()), names="value")
    idx.observe(show, names="value")
    show()
    return browser_static(W.VBox([W.HBox([pick, idx]), view]), rows)  # + a static table for readers without a kernel
