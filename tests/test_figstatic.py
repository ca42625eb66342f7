"""Static copies of plotly figures: the matplotlib PNG of each trace type, tables as HTML, the
combined renderer, and an executed tiny round read as nbconvert's HTML (an image per figure)."""

import base64
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from plotly.subplots import make_subplots
from PIL import Image

from steerheal_utils import figstatic as fs

REPO = Path(__file__).resolve().parent.parent
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def pixels(fig, **kw) -> np.ndarray:
    """The figure's PNG as an ``[h, w, 3]`` uint8 array (full RGB: exact colours to look for)."""
    return np.asarray(Image.open(io.BytesIO(fs.to_png(fig, colors=None, **kw))).convert("RGB"))


def where(img: np.ndarray, rgb, tol: int = 30) -> np.ndarray:
    return np.all(np.abs(img.astype(int) - np.array(rgb)) <= tol, axis=-1)


def runs(flags) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of True in a 1-D boolean array."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


# ------------------------------------------------------------------ the PNG
def test_png_has_the_figures_size_and_scale():
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout=dict(width=500, height=300))
    assert Image.open(io.BytesIO(fs.to_png(fig))).size == (500, 300)
    assert Image.open(io.BytesIO(fs.to_png(fig, scale=2))).size == (1000, 600)
    fig.update_layout(width=None)
    assert Image.open(io.BytesIO(fs.to_png(fig))).size == (fs.WIDTH, 300)
    png = fs.to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).mode == "P"  # palette: small


def test_bars_stand_where_their_values_put_them():
    img = pixels(go.Figure(go.Bar(x=["a", "b", "c"], y=[1, 0, 3], marker_color="#ff0000")), width=600, height=400)
    red = where(img, RED)
    cols = runs(red.any(axis=0))
    assert len(cols) == 2, cols  # b has height 0
    (a0, a1), (c0, c1) = cols
    h_a, h_c = red[:, (a0 + a1) // 2].sum(), red[:, (c0 + c1) // 2].sum()
    assert 2.8 < h_c / h_a < 3.2
    assert 2.2 < ((c0 + c1) / 2 - (a0 + a1) / 2) / (a1 - a0) < 2.8  # two category steps of a 0.8-wide bar
    assert red[:, c0:c1].any(axis=1).nonzero()[0].max() == red[:, a0:a1].any(axis=1).nonzero()[0].max()  # one baseline


@pytest.mark.parametrize("mode", ["stack", "group", "overlay"])
def test_barmode_stacks_groups_or_overlays(mode):
    fig = go.Figure([go.Bar(x=["a", "b"], y=[1, 1], marker_color="#ff0000"),
                     go.Bar(x=["a", "b"], y=[1, 3], marker_color="#0000ff")], layout=dict(barmode=mode, showlegend=False))
    img = pixels(fig, width=600, height=400)
    red, blue = where(img, RED), where(img, BLUE)
    (ra0, ra1), (rb0, rb1) = runs(red.any(axis=0)) if mode != "overlay" else [(0, 0), (0, 0)]
    if mode == "stack":
        mid = (rb0 + rb1) // 2
        assert red[:, mid].sum() == pytest.approx(blue[:, mid].sum() / 3, rel=0.1)
        assert blue[:, mid].nonzero()[0].max() < red[:, mid].nonzero()[0].min()  # blue sits on red
        total_a = red[:, (ra0 + ra1) // 2].sum() + blue[:, (ra0 + ra1) // 2].sum()
        assert (red[:, mid].sum() + blue[:, mid].sum()) / total_a == pytest.approx(2, rel=0.1)
    elif mode == "group":
        blue_cols = runs(blue.any(axis=0))
        assert len(blue_cols) == 2 and blue_cols[0][0] >= ra1  # side by side, red left of blue
        assert red[:, (ra0 + ra1) // 2].sum() == pytest.approx(blue[:, (blue_cols[0][0] + blue_cols[0][1]) // 2].sum(), rel=0.1)
    else:
        assert red.sum() < 0.02 * blue.sum()  # same places, blue drawn over red


def test_log_axis_spaces_decades_evenly():
    def gaps(kind):
        fig = go.Figure(go.Scatter(x=[1, 10, 100], y=[1, 1, 1], mode="markers", marker=dict(color="#0000ff", size=12)))
        fig.update_xaxes(type=kind)
        blue = where(pixels(fig, width=700, height=300), BLUE)
        xs = [(a + b) / 2 for a, b in runs(blue.any(axis=0))]
        return xs[1] - xs[0], xs[2] - xs[1]

    lo, hi = gaps("log")
    assert hi / lo == pytest.approx(1, abs=0.05)
    lo, hi = gaps("linear")  # the same points on a linear axis are not evenly spaced
    assert hi / lo > 5


def test_error_bars_span_their_asymmetric_intervals():
    fig = go.Figure(go.Scatter(x=[0, 1], y=[5, 5], mode="markers", marker=dict(color="#0000ff", size=8),
                               error_y=dict(type="data", symmetric=False, array=[3, 1], arrayminus=[1, 1], color="#ff0000")))
    fig.update_yaxes(range=[0, 10])
    img = pixels(fig, width=600, height=400)
    red, blue = where(img, RED), where(img, BLUE)
    (a0, a1), (b0, b1) = runs(red.any(axis=0))
    rows_a, rows_b = red[:, a0:a1].any(axis=1).nonzero()[0], red[:, b0:b1].any(axis=1).nonzero()[0]
    assert (rows_a.max() - rows_a.min()) / (rows_b.max() - rows_b.min()) == pytest.approx(2, rel=0.1)  # 4 vs 2 units
    _, y_mark = centre(blue[:, : img.shape[1] // 2])
    assert (y_mark - rows_a.min()) / (rows_a.max() - y_mark) == pytest.approx(3, rel=0.15)  # 3 up, 1 down


def test_histogram_counts_values_per_bin():
    img = pixels(go.Figure(go.Histogram(x=[0, 0, 0, 1], marker_color="#ff0000")), width=600, height=400)
    red = where(img, RED)
    bars = runs(red.any(axis=0))
    heights = [red[:, (a + b) // 2].sum() for a, b in bars]
    if len(bars) == 1:  # adjacent bins touch (bargap 0): split the run where the height changes
        col = red.sum(axis=0)
        heights = sorted({int(h) for h in col[col > 0]}, reverse=True)
    assert heights[0] / heights[-1] == pytest.approx(3, rel=0.1)


def test_fill_toself_is_a_filled_area():
    fig = go.Figure([go.Scatter(x=[0, 2, 2, 0], y=[0, 0, 1, 1], fill="toself", fillcolor="rgba(255,0,0,1)",
                                mode="lines", line=dict(width=0)),
                     go.Scatter(x=[0, 2], y=[2, 2], mode="lines")], layout=dict(showlegend=False))
    red = where(pixels(fig, width=600, height=400), RED)
    ys, xs = np.nonzero(red)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert red.sum() > 0.95 * box and box > 10_000  # a solid rectangle, not an outline


def test_box_draws_its_box_and_the_outlier_apart():
    fig = go.Figure(go.Box(y=[1, 2, 2.5, 3, 4, 40], name="g", marker_color="#0000ff"))
    blue = where(pixels(fig, width=500, height=400), BLUE)
    col = blue.any(axis=1)
    assert len(runs(col)) >= 2  # box + whiskers, then a gap, then the outlier above
    top, rest = runs(col)[0], runs(col)[-1]
    assert top[1] - top[0] < 0.3 * (rest[1] - rest[0]) + 12


def test_heatmap_puts_row_zero_at_the_bottom_and_leaves_gaps_empty():
    fig = go.Figure(go.Heatmap(z=[[0, 1], [None, 0.5]], colorscale=[[0, "#000000"], [1, "#ff0000"]], showscale=False))
    img = pixels(fig, width=500, height=400)
    (bx, by), (rx, ry), (dx, dy) = (centre(where(img, c, tol=10)) for c in ((0, 0, 0), RED, (128, 0, 0)))
    assert rx > bx and abs(ry - by) < 5  # z[0] = [0, 1]: one row, black left of red
    assert dy < ry - 50 and abs(dx - rx) < 5  # z[1][1] = 0.5 above z[0][1]
    assert not where(img[int(dy) - 5:int(dy) + 5, int(bx) - 5:int(bx) + 5], (0, 0, 0), tol=60).any()  # the None cell


def test_subplot_and_figure_titles_are_drawn_once():
    from matplotlib.text import Text

    fig = make_subplots(rows=1, cols=2, subplot_titles=("left panel", "right panel"))
    fig.add_scatter(x=[1, 2], y=[1, 2], row=1, col=1)
    fig.add_bar(x=["a"], y=[1], row=1, col=2)
    fig.add_hline(y=1.5, annotation_text="gate", line_dash="dash", row=1, col=1)
    fig.update_layout(title="the <b>figure</b>", xaxis_title="dose")
    m = fs.draw(fig)
    texts = [t.get_text() for t in m.findobj(Text) if t.get_visible()]
    assert [a.get_title() for a in m.axes] == ["left panel", "right panel"]
    for s in ("left panel", "right panel", "the figure", "gate", "dose"):
        assert texts.count(s) == 1, (s, texts)


def test_hline_spans_its_own_subplot_only():
    fig = make_subplots(rows=1, cols=2)
    fig.add_scatter(x=[0, 1], y=[0, 1], row=1, col=1)
    fig.add_scatter(x=[0, 1], y=[0, 1], row=1, col=2)
    fig.add_hline(y=0.5, line_color="#ff0000", row=1, col=1)
    img = pixels(fig, width=800, height=400)
    xs = np.nonzero(where(img, RED).any(axis=0))[0]
    assert xs.max() < 0.55 * img.shape[1] and xs.max() - xs.min() > 0.3 * img.shape[1]


def test_what_cannot_be_drawn_is_named_on_the_image():
    m = fs.draw(go.Figure([go.Pie(values=[1, 2]), go.Scatter(x=[1, 2], y=[1, 2])]))
    notes = [t.get_text() for t in m.texts] + [m._supxlabel.get_text() if m._supxlabel else ""]
    assert any("not drawn" in n and "pie" in n for n in notes)


def test_values_reads_plotly_typed_arrays():
    d = go.Figure(go.Heatmap(z=np.array([[1.5, 2.0], [3.0, 4.5]]), x=np.arange(2))).to_dict()["data"][0]
    assert isinstance(d["z"], dict) and "bdata" in d["z"]  # what plotly >= 6 stores
    assert fs.values(d["z"]) == [[1.5, 2.0], [3.0, 4.5]] and fs.values(d["x"]) == [0, 1]


# ------------------------------------------------------------------ tables, the bundle, the renderer
def test_a_table_figure_becomes_escaped_html():
    fig = go.Figure(go.Table(header=dict(values=["id", "completion"]),
                             cells=dict(values=[["r0", "r1"], ["<script>x</script>", "a\nb"]])),
                    layout=dict(title="kept examples"))
    bundle = fs.mimebundle(fig)
    assert list(bundle) == ["text/html"]
    h = bundle["text/html"]
    assert "<script>" not in h and "&lt;script&gt;x&lt;/script&gt;" in h and "a<br>b" in h
    assert h.count("kept examples") == 1 and "<th style=\"text-align:left\">completion</th>" in h
    assert h.index("r0") < h.index("r1")  # rows in order


def test_show_emits_one_bundle_with_the_interactive_figure_and_its_static_copy(monkeypatch):
    import plotly.io._renderers as R

    shown = []
    monkeypatch.setattr(R.ipython_display, "display", lambda bundle, raw=False: shown.append(bundle))
    monkeypatch.setattr(pio.renderers, "default", fs.register())
    go.Figure(go.Bar(x=["a"], y=[1])).show()
    go.Figure(go.Table(header=dict(values=["a"]), cells=dict(values=[["1"]]))).show()
    assert len(shown) == 2
    assert set(shown[0]) == {"application/vnd.plotly.v1+json", "image/png"}
    assert base64.b64decode(shown[0]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(shown[1]) == {"application/vnd.plotly.v1+json", "text/html"}


def test_a_figure_that_cannot_be_drawn_gives_a_note_not_a_failed_cell():
    with pytest.warns(UserWarning, match="no static copy"):
        b = fs.StaticRenderer().to_mimebundle({"data": [{"type": "bar", "y": [1]}], "layout": {"width": "wide"}})
    assert list(b) == ["text/plain"] and "no static copy" in b["text/plain"]


def test_stage_stores_both_and_keeps_the_override(monkeypatch):
    from steerheal_utils import stage

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    monkeypatch.delenv("STEERHEAL_PLOTLY_RENDERER", raising=False)
    stage._plotly_renderer()
    assert pio.renderers.default == "plotly_mimetype+steerheal_static"
    monkeypatch.setenv("STEERHEAL_PLOTLY_RENDERER", "plotly_mimetype")
    stage._plotly_renderer()
    assert pio.renderers.default == "plotly_mimetype"


# ------------------------------------------------------------------ an executed round, read as HTML
@pytest.mark.slow  # one tiny round through the driver: ~1.5 min quiet, ~3 min on the shared cores
def test_every_figure_of_an_executed_round_has_an_image_in_the_html_export(tmp_path):
    from nbconvert import HTMLExporter

    run = tmp_path / "run"
    env = {**os.environ, "STEERHEAL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("STEERHEAL_PLOTLY_RENDERER", None)
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "run", "--preset", "tiny", "--rounds", "1",
                        "--run-dir", str(run)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    static_bytes, n_figs = 0, 0
    for path in sorted((run / "round_00").glob("0*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        figs = [o["data"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "application/vnd.plotly.v1+json" in o.get("data", {})]
        pngs = [d["image/png"] for d in figs if "image/png" in d]
        tables = [d["text/html"] for d in figs if "text/html" in d]
        assert len(pngs) + len(tables) == len(figs), f"{path.name}: a figure without a static copy"
        for p in pngs:
            img = Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB")
            assert img.width >= 400 and len(set(img.getdata())) > 8  # drawn, not blank
        outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        widgets = [o["data"] for o in outs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert all("text/html" in d for d in widgets), f"{path.name}: a widget without a static copy"
        assert not (nb.metadata.get("widgets") or {}).get("application/vnd.jupyter.widget-state+json", {}).get("state")
        text = "".join(o.get("text", "") for o in outs if o.get("output_type") == "stream")
        assert "0%|" not in text, f"{path.name}: a progress bar saved frozen"
        static_bytes += sum(map(len, pngs)) + sum(map(len, tables))
        n_figs += len(figs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            body, _ = HTMLExporter().from_notebook_node(nb)
        assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', body)) == len(pngs), path.name
        n_widget_tables = sum(d["text/html"].count('class="steerheal-static-table"') for d in widgets)
        assert body.count('class="steerheal-static-table"') == len(tables) + n_widget_tables, path.name
    assert n_figs >= 12  # 01-05 show at least a dozen figures on a tiny round
    heal = nbformat.read(run / "round_00" / "04_heal.ipynb", as_version=4)
    assert re.search(r"heal r00: \d+/\d+ in ", "".join(o.get("text", "") for c in heal.cells if c.cell_type == "code"
                                                         for o in c.get("outputs", []))), "heal's finished bar as text"
    sizes = {p.name: p.stat().st_size for p in (run / "round_00").glob("0*.ipynb")}
    print("executed notebook sizes (bytes):", sizes, "total", sum(sizes.values()))
    assert static_bytes < 300_000, static_bytes  # measured ~190 KB a round (PNG palette, 900 px wide)


# ------------------------------------------------------------------ widgets with a static copy
def test_a_widget_carries_its_static_html_and_nbconvert_shows_it():
    W = pytest.importorskip("ipywidgets")
    from nbconvert import HTMLExporter

    from steerheal_utils import filter as filt

    rows = [{"id": "a", "reason": "keep", "prompt": "p", "completion": "<b>kept</b> text", "tail_ppl": 3.0},
            {"id": "b", "reason": "token_soup", "prompt": "p", "completion": "zz zz", "tail_ppl": 90.0}]
    w = filt.browser(rows)
    data = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data  # JupyterLab still gets the widget
    static = data["text/html"]
    assert "&lt;b&gt;kept&lt;/b&gt;" in static and "<b>kept</b>" not in static  # escaped, not markup
    assert "keep 1" in static and "token_soup 1" in static
    assert isinstance(w.children, tuple)  # the wrapper passes attributes through to the widget
    # a saved notebook has no widget state: nbconvert falls through to the static copy
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("browser")
    cell.outputs = [nbformat.v4.new_output("execute_result", data=data, execution_count=1)]
    nb.cells = [cell]
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert "token_soup: 1 of 1" in body
