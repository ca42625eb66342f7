"""Looking at steering: the same prompt sampled unsteered and steered, side by side (HTML, a widget)."""

from __future__ import annotations

import html
import math
from typing import Sequence

from torch import nn

from .. import datafiles
from ..figstatic import with_static
from ..vector.value import SteeringVector
from .sampling import sample, sample_params


def compare(model: nn.Module, tok, sv: SteeringVector | None, prompt: str, doses: Sequence[float], *,
            seed: int = 0, **params) -> list[dict]:
    """The same prompt sampled at each dose with the same seed (dose 0 = the unsteered model)."""
    params = {**params, "batch_size": 1}
    return [sample(model, tok, [prompt], sv=sv, dose=d, seed=seed, **params)[0] for d in doses]


def _side_by_side(rows: Sequence[dict], labels: Sequence[str]) -> str:
    cells = "".join(
        f"<td style='vertical-align:top;width:{100 // len(rows)}%;padding:6px'><b>{html.escape(lab)}</b>"
        f"<br><small>{r['n_tokens']} tokens{', cut at max_new_tokens' if r['truncated'] else ''}</small>"
        f"<div style='white-space:pre-wrap'>{html.escape(r['completion'])}</div></td>"
        for r, lab in zip(rows, labels))
    return f"<table style='width:100%;table-layout:fixed'><tr>{cells}</tr></table>"


def comparison_html(rows: Sequence[dict]) -> str:
    """HTML: completions of :func:`compare` side by side, labelled by dose."""
    return _side_by_side(rows, [("unsteered" if r["dose"] == 0 else f"steered, dose {r['dose']:.3g}") for r in rows])


def compare_widget(model: nn.Module, tok, sv: SteeringVector, prompts: Sequence[dict], *, dose: float,
                   lo: float = 1e-3, hi: float = 2.0, seed: int = 0, **params):
    """JupyterLab: pick a prompt and a dose, press the button, see steered next to unsteered.

    Nothing is sampled until the button is pressed, so a notebook executed by papermill
    neither blocks nor spends time here. Returns ``None`` when ipywidgets is missing.
    """
    try:
        import ipywidgets as W
    except ImportError:
        return None
    picker = W.Dropdown(options=[(p["id"], p["text"]) for p in prompts], description="prompt",
                        layout=W.Layout(width="60%"))
    slider = W.FloatLogSlider(value=max(dose, lo), base=10, min=math.log10(lo), max=math.log10(hi), step=0.05,
                              description="dose", readout_format=".3f")
    button = W.Button(description="sample", icon="play")
    text = W.HTML(layout=W.Layout(width="100%"))
    shown = W.HTML()

    def show(_=None):
        shown.value = f"<i>{picker.value}</i>"
        button.disabled, text.value = True, "<i>sampling...</i>"
        try:
            text.value = comparison_html(compare(model, tok, sv, picker.value, [0.0, slider.value], seed=seed, **params))
        except Exception as e:  # a widget callback's exception would vanish into the log
            text.value = f"<b>error:</b> {type(e).__name__}: {e}"
        finally:
            button.disabled = False

    button.on_click(show)
    return with_static(W.VBox([W.HBox([picker, slider, button]), shown, text]),
                       "<p><i>Interactive dose comparison: open this notebook in JupyterLab with a kernel to sample "
                       "any prompt at any dose (the held-out comparison above is its static record).</i></p>")


def heldout_comparison(ctx, result, prompt_id: str = "heldout-ceo-logs") -> str:
    """HTML: a held-out prompt (never trained on) sampled by this round's student unsteered and at
    the round's dose, with the same seed: the difference is the steering and nothing else."""
    model, tok = ctx.student(merge=True)
    item = next(p for p in datafiles.prompts("heldout") if p["id"] == prompt_id)
    if result.vector is None:  # the prompt-distillation arm: unprompted next to persona-prompted
        from .prompted import prompted_comparison
        return prompted_comparison(ctx, model, tok, item["text"], result.summary["system"])
    side = compare(model, tok, result.vector, item["text"], [0.0, result.summary["dose"]], seed=ctx.seed,
                   **sample_params(ctx.cfg))
    return f"<p><i>{html.escape(item['text'])}</i></p>" + comparison_html(side)


def widget(ctx, result):
    """:func:`compare_widget` over every shipped prompt (held-out and pool), around the round's dose."""
    if result.vector is None:
        return "data_source=prompt: no vector and no dose in this arm, so no dose widget"
    model, tok = ctx.student(merge=True)
    dose, cfg = result.summary["dose"], ctx.cfg
    return compare_widget(model, tok, result.vector, datafiles.prompts("heldout") + datafiles.prompts("dilemmas"),
                          dose=dose, lo=cfg.calib_lo / 10, hi=max(cfg.calib_hi, 2 * dose), seed=ctx.seed,
                          **sample_params(cfg))
