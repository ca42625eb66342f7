"""Static copies of plotly figures, for executed notebooks read without a kernel.

``fig.show()`` in a stage notebook stores the figure as plotly JSON
(``application/vnd.plotly.v1+json``), which only JupyterLab with plotly's extension draws:
nbconvert's HTML, GitHub and nbviewer show an empty cell. The renderer registered here puts a
static copy in the same output bundle: a PNG drawn with matplotlib, or, for a figure made
only of ``go.Table`` traces, an HTML table. JupyterLab keeps drawing the interactive figure
(plotly's renderer ranks above PNG and HTML); the other readers show the static copy.

Why matplotlib: plotly's own PNG export (``fig.to_image``) needs kaleido >= 1, which needs a
Chrome install that cannot be downloaded offline, and kaleido 0.2.1 (bundled Chromium) is
refused by plotly >= 6. So the PNG is drawn from the figure's JSON, following plotly.js's
defaults where this project's figures rely on them. Drawn: ``scatter`` (lines, markers,
text labels, error bars, ``fill`` toself/tozeroy/tonexty), ``bar`` and ``histogram`` (barmode
group/stack/relative/overlay), ``box``, ``heatmap``; subplots on a grid (make_subplots), log
and category axes, ranges, ``dtick``, tick values, axis titles, subplot titles, shapes
(lines and rectangles, as add_hline/add_vline/add_hrect/add_vrect make them), annotations,
the title and the legend. Whatever else a figure holds is named in a grey footnote on the
image ("static copy: not drawn: ..."), never dropped silently.

Example:
    >>> import plotly.graph_objects as go
    >>> png = to_png(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])))   # doctest: +SKIP
    >>> pio.renderers.default = register()   # "plotly_mimetype+steerheal_static"  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

RENDERER = "steerheal_static"
DEFAULT_RENDERERS = f"plotly_mimetype+{RENDERER}"
WIDTH = 900  # px, when the figure sets no width: about a JupyterLab output area
HEIGHT = 450  # px, plotly.js's default height
DPI = 100  # the PNG has width x height pixels at scale 1; one plotly px = 0.72 pt
PT = 72 / DPI  # points per plotly px

_CARTESIAN = {"scatter", "scattergl", "bar", "histogram", "box", "heatmap"}
_DASH = {"solid": "-", "dot": (0, (1, 2.5)), "dash": (0, (4, 2.5)), "longdash": (0, (7, 2.5)),
         "dashdot": (0, (4, 2, 1, 2)), "longdashdot": (0, (7, 2, 1, 2))}
_SYMBOL = {"circle": "o", "square": "s", "diamond": "D", "cross": "P", "x": "X", "triangle-up": "^",
           "triangle-down": "v", "triangle-left": "<", "triangle-right": ">", "star": "*", "hexagon": "h",
           "pentagon": "p", "circle-open": "o", "line-ns": "|", "line-ew": "_"}
_FALLBACK_COLORWAY = ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880",
                      "#FF97FF", "#FECB52"]


# ------------------------------------------------------------------ plain helpers
def figure_dict(fig: Any) -> dict:
    """The figure as a plain dict: a ``go.Figure``, its ``to_dict()``/JSON form, or a renderer's dict."""
    if isinstance(fig, dict):
        return fig
    if hasattr(fig, "to_dict"):
        return fig.to_dict()
    raise TypeError(f"expected a plotly figure or its dict, got {type(fig).__name__}")


def values(v: Any) -> list:
    """A data array as a list: plain lists, numpy arrays and plotly's base64 typed arrays
    (``{"dtype": "f8", "bdata": ..., "shape": "2, 3"}``) all come back as (nested) lists."""
    if v is None:
        return []
    if isinstance(v, dict) and "bdata" in v:
        import numpy as np

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        if v.get("shape"):
            a = a.reshape([int(s) for s in str(v["shape"]).split(",")])
        return a.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [values(x) if isinstance(x, dict) or hasattr(x, "tolist") else x for x in v]
    return [v]


def floats(v: Any) -> list[float]:
    """Numbers of a 1-D array, ``nan`` where a value is missing or not a number."""
    out = []
    for x in values(v):
        try:
            out.append(float(x) if x is not None and not isinstance(x, bool) else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def plain_text(s: Any) -> str:
    """Plotly's HTML-ish label text as plain text: ``<br>`` is a new line, other tags go."""
    if s is None:
        return ""
    s = re.sub(r"<br\s*/?>", "\n", str(s), flags=re.I)
    return html.unescape(re.sub(r"<[^>]+>", "", s)).strip()


def text_color(s: Any) -> str | None:
    """The first ``color:`` of an inline style in a label (plotly titles flag warnings that way)."""
    m = re.search(r"color\s*:\s*([#\w(),.\s]+?)\s*[;'\"]", str(s or ""))
    return m.group(1) if m else None


def rgba(c: Any, default: Any = "#444") -> tuple[float, float, float, float]:
    """A plotly colour (CSS name, ``#rgb``/``#rrggbb``, ``rgb()``/``rgba()``) as an RGBA tuple."""
    import matplotlib.colors as mcolors

    if c is None:
        return rgba(default) if default is not None else (0, 0, 0, 0)
    m = re.fullmatch(r"\s*rgba?\(([^)]*)\)\s*", str(c))
    if m:
        parts = [float(p) for p in m.group(1).replace("/", ",").split(",") if p.strip()]
        r, g, b = (p / 255 for p in parts[:3])
        return (r, g, b, parts[3] if len(parts) > 3 else 1.0)
    try:
        return mcolors.to_rgba(str(c).strip().lower() if not str(c).startswith("#") else str(c))
    except ValueError:
        return rgba(default) if default is not None else (0, 0, 0, 0)


def with_alpha(c: tuple, alpha: float | None) -> tuple:
    return c if alpha is None else (c[0], c[1], c[2], c[3] * alpha)


def merged(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``, nested dicts merged key by key (template defaults under a trace)."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return over if over is not None else base
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(base.get(k), v)
    return out


def title_text(t: Any) -> str:
    """A layout or axis ``title`` (a dict with ``text``, or a bare string) as plain text."""
    return plain_text(t.get("text") if isinstance(t, dict) else t)


def bin_edges(data: list[float], spec: dict | None, nbins: int | None) -> list[float]:
    """Histogram bin edges: ``xbins`` (start/end/size) when given, else ``nbinsx`` equal bins, else
    numpy's 'auto' rule; integer data get integer-aligned bins (as plotly's auto-binning does)."""
    import numpy as np

    a = np.asarray([x for x in data if math.isfinite(x)], dtype=float)
    if a.size == 0:
        return [0.0, 1.0]
    lo, hi = float(a.min()), float(a.max())
    spec = spec or {}
    if spec.get("size"):
        start = float(spec.get("start", lo))
        end = float(spec.get("end", hi))
        size = float(spec["size"])
        n = max(1, math.ceil((end - start) / size + 1e-9))
        if start + n * size <= hi and spec.get("end") is None:
            n += 1
        return [start + i * size for i in range(n + 1)]
    if lo == hi:
        return [lo - 0.5, hi + 0.5]
    if nbins:
        return np.linspace(lo, hi, int(nbins) + 1).tolist()
    edges = np.histogram_bin_edges(a, bins="auto")
    if np.all(a == np.round(a)):  # counts: one bar per integer value, or integer-wide bins
        width = max(1, round(float(edges[1] - edges[0])))
        return np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 0.5 + width, width).tolist()
    return edges.tolist()


def table_html(fig: Any) -> str | None:
    """The ``go.Table`` traces of a figure as static HTML (its title as a caption), or None when it
    has none. Cell text is escaped: completions are shown as written, never interpreted as markup."""
    d = figure_dict(fig)
    tables = [t for t in d.get("data", []) if t.get("type") == "table"]
    if not tables:
        return None
    title = title_text((d.get("layout") or {}).get("title"))
    parts = []
    for t in tables:
        head = [plain_text(h) for h in values((t.get("header") or {}).get("values"))]
        cols = [values(c) if isinstance(c, (list, tuple, dict)) or hasattr(c, "tolist") else [c]
                for c in values((t.get("cells") or {}).get("values"))]
        nrow = max((len(c) for c in cols), default=0)
        esc = lambda v: html.escape("" if v is None else str(v)).replace("\n", "<br>")  # noqa: E731
        rows = "".join("<tr>" + "".join(f"<td style=\"text-align:left;vertical-align:top\">{esc(c[i] if i < len(c) else '')}</td>"
                                        for c in cols) + "</tr>" for i in range(nrow))
        cap = f"<caption style=\"caption-side:top;text-align:left;font-weight:bold\">{html.escape(title)}</caption>" if title else ""
        parts.append(f"<table class=\"steerheal-static-table\">{cap}<thead><tr>"
                     + "".join(f"<th style=\"text-align:left\">{html.escape(h)}</th>" for h in head)
                     + f"</tr></thead><tbody>{rows}</tbody></table>")
        title = ""  # one caption per figure
    return "\n".join(parts)


# ------------------------------------------------------------------ drawing
@dataclass
class _Panel:
    """One subplot: a matplotlib Axes and the plotly axes it stands for."""

    ax: Any
    xname: str  # "x", "x2", ...
    yname: str
    xlay: dict
    ylay: dict
    xtype: str = "linear"  # linear | log | category
    ytype: str = "linear"
    xcats: list = field(default_factory=list)
    ycats: list = field(default_factory=list)
    subtitle: Any = None  # the matplotlib Text of its subplot title


def _axis_key(name: str) -> str:
    """``"x2"`` -> ``"xaxis2"`` (the layout key)."""
    return f"{name[0]}axis{name[1:]}"


def _grid(domains: list[tuple[float, float]], reverse: bool = False) -> tuple[list[tuple[float, float]], list[tuple[int, int]]]:
    """Grid cells covering the given axis domains, and each domain's (first, last+1) cell span.

    The cells are the intervals between consecutive domain ends that some domain covers (the
    spacing between subplots is left to matplotlib's layout); ``reverse`` numbers them from the
    top (y domains grow upwards, grid rows downwards)."""
    ends = sorted({e for d in domains for e in d}, reverse=reverse)
    cells = []
    for a, b in zip(ends, ends[1:]):
        lo, hi = min(a, b), max(a, b)
        if any(d[0] <= lo + 1e-9 and hi <= d[1] + 1e-9 for d in domains):
            cells.append((lo, hi))
    spans = []
    for d in domains:
        inside = [i for i, (lo, hi) in enumerate(cells) if d[0] <= lo + 1e-9 and hi <= d[1] + 1e-9]
        spans.append((min(inside), max(inside) + 1))
    return cells, spans


class _Drawer:
    """Draws one figure dict onto a matplotlib Figure (one instance per figure)."""

    def __init__(self, fig: dict, width: int, height: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.d = fig
        self.layout = fig.get("layout") or {}
        tmpl = self.layout.get("template") or {}
        self.tlayout = tmpl.get("layout") or {} if isinstance(tmpl, dict) else {}
        self.tdata = tmpl.get("data") or {} if isinstance(tmpl, dict) else {}
        self.skipped: list[str] = []
        self.fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(self.fig)  # an Agg canvas of its own: text sizes can be measured, pyplot is not involved
        self.fig.set_facecolor(rgba(self.lay("paper_bgcolor"), "white"))
        self.font_color = rgba((self.lay("font") or {}).get("color"), "#2a3f5f")
        self.font_px = float((self.lay("font") or {}).get("size") or 12)
        self.colorway = self.lay("colorway") or _FALLBACK_COLORWAY
        self.panels: dict[tuple[str, str], _Panel] = {}

    def lay(self, key: str) -> Any:
        """A layout value, else the template's."""
        v = self.layout.get(key)
        return v if v is not None else self.tlayout.get(key)

    def axis_lay(self, name: str) -> dict:
        return merged(self.tlayout.get(_axis_key(name[0])) or {}, self.layout.get(_axis_key(name)) or {})

    def skip(self, what: str) -> None:
        if what not in self.skipped:
            self.skipped.append(what)

    # ---- layout of the subplots
    def make_panels(self, traces: list[dict]) -> None:
        pairs = []
        for t in traces:
            if t.get("type", "scatter") in _CARTESIAN:
                p = (t.get("xaxis") or "x", t.get("yaxis") or "y")
                if p not in pairs:
                    pairs.append(p)
        for key, ax in self.layout.items():  # subplots without traces (an empty make_subplots cell)
            m = re.fullmatch(r"xaxis(\d*)", key)
            if m and isinstance(ax, dict) and str(ax.get("anchor", "")).startswith("y"):
                p = ("x" + m.group(1), ax["anchor"])
                if p not in pairs:
                    pairs.append(p)
        if not pairs:
            return
        xdom = [tuple((self.layout.get(_axis_key(x)) or {}).get("domain") or (0.0, 1.0)) for x, _ in pairs]
        ydom = [tuple((self.layout.get(_axis_key(y)) or {}).get("domain") or (0.0, 1.0)) for _, y in pairs]
        cols, cspan = _grid(xdom)
        rows, rspan = _grid(ydom, reverse=True)
        gs = self.fig.add_gridspec(len(rows), len(cols), width_ratios=[b - a for a, b in cols],
                                   height_ratios=[b - a for a, b in rows])
        for (x, y), (c0, c1), (r0, r1) in zip(pairs, cspan, rspan):
            ax = self.fig.add_subplot(gs[r0:r1, c0:c1])
            self.panels[(x, y)] = _Panel(ax, x, y, self.axis_lay(x), self.axis_lay(y))

    def axis_type(self, lay: dict, data: list) -> str:
        t = lay.get("type")
        if t in ("log", "category", "linear"):
            return t
        if t == "date":
            self.skip("date axis (drawn as categories)")
            return "category"
        return "category" if any(isinstance(v, str) for v in data) else "linear"

    def type_axes(self, traces: list[dict]) -> None:
        """Each axis's type from the layout, else from its first trace's data (strings: category)."""
        seen: dict[tuple[str, str], list] = {}
        for t in traces:
            kind = t.get("type", "scatter")
            if kind not in _CARTESIAN:
                continue
            key = (t.get("xaxis") or "x", t.get("yaxis") or "y")
            xs, ys = values(t.get("x")), values(t.get("y"))
            if kind == "box" and not (xs if _orient(t) == "v" else ys):  # a box sits at its name
                (xs if _orient(t) == "v" else ys).append(str(t.get("name", "")))
            seen.setdefault(("x",) + key, []).extend(xs[:50] if kind != "heatmap" else xs)
            seen.setdefault(("y",) + key, []).extend(ys[:50] if kind != "heatmap" else ys)
        for key, p in self.panels.items():
            p.xtype = self.axis_type(p.xlay, seen.get(("x",) + key, []))
            p.ytype = self.axis_type(p.ylay, seen.get(("y",) + key, []))

    # ---- positions
    def pos(self, p: _Panel, letter: str, vals: list) -> list[float]:
        """Data values as matplotlib positions: a category's index, else the number."""
        if (p.xtype if letter == "x" else p.ytype) != "category":
            return floats(vals)
        cats = p.xcats if letter == "x" else p.ycats
        out = []
        for v in vals:
            k = str(v) if v is not None else None
            if k is None:
                out.append(math.nan)
                continue
            if k not in cats:
                cats.append(k)
            out.append(float(cats.index(k)))
        return out

    def coord(self, p: _Panel, letter: str, v: Any, *, annotation: bool = False) -> float:
        """A shape's or annotation's data coordinate: an annotation on a log axis is given in
        log10 units (plotly.js convention); a shape on a log axis in data units."""
        typ = p.xtype if letter == "x" else p.ytype
        if typ == "category" and isinstance(v, str):
            return self.pos(p, letter, [v])[0]
        f = floats([v])[0]
        return 10 ** f if annotation and typ == "log" else f

    def trace_color(self, t: dict, i: int) -> tuple:
        line = t.get("line") or {}
        marker = t.get("marker") or {}
        c = line.get("color") if isinstance(line.get("color"), str) else None
        if c is None and isinstance(marker.get("color"), str):
            c = marker["color"]
        return rgba(c if c is not None else self.colorway[i % len(self.colorway)])

    # ---- traces
    def draw_traces(self, traces: list[dict]) -> list[tuple[Any, str]]:
        """Draw every trace; return the legend's (handle, label) pairs in plotly's order."""
        legend: list[tuple[int, Any, str]] = []
        bars: dict[tuple[str, str], list[tuple[int, dict]]] = {}
        prev_y: dict[tuple[str, str], tuple[list, list]] = {}
        for i, t in enumerate(traces):
            kind = t.get("type", "scatter")
            if t.get("visible") is False or t.get("visible") == "legendonly":
                continue
            if kind == "table":
                self.skip("table (shown as HTML instead)")
                continue
            if kind not in _CARTESIAN:
                self.skip(f"{kind} trace")
                continue
            key = (t.get("xaxis") or "x", t.get("yaxis") or "y")
            t = merged((self.tdata.get(kind) or [{}])[0], t)
            if kind in ("bar", "histogram"):
                bars.setdefault(key, []).append((i, t))
                continue
            draw = getattr(self, f"draw_{'scatter' if kind == 'scattergl' else kind}")
            handle = draw(self.panels[key], t, i, prev_y.setdefault(key, ([], [])))
            if handle is not None and self.in_legend(t):
                legend.append((i, handle, str(t.get("name", f"trace {i}"))))
        for key, items in bars.items():
            for i, t, handle in self.draw_bars(self.panels[key], items):
                if self.in_legend(t):
                    legend.append((i, handle, str(t.get("name", f"trace {i}"))))
        # plotly lists stacked bars top-down: its legend order is then reversed
        stacked = self.lay("barmode") in ("stack", "relative") and bool(bars)
        legend.sort(key=lambda e: -e[0] if stacked else e[0])
        return [(h, name) for _, h, name in legend]

    def in_legend(self, t: dict) -> bool:
        return t.get("showlegend") is not False and t.get("type") != "heatmap"

    def draw_scatter(self, p: _Panel, t: dict, i: int, prev: tuple[list, list]) -> Any:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        ax = p.ax
        ys_raw = values(t.get("y"))
        xs_raw = values(t.get("x")) or list(range(len(ys_raw)))
        x, y = self.pos(p, "x", xs_raw), self.pos(p, "y", ys_raw)
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        mode = t.get("mode") or ("lines+markers" if n < 20 else "lines")
        color = self.trace_color(t, i)
        alpha = t.get("opacity")
        line = t.get("line") or {}
        marker = t.get("marker") or {}
        z = 3 + i * 1e-3
        lw = float(line.get("width", 2)) * PT
        ls = _DASH.get(line.get("dash") or "solid", "-")
        handle = None
        fill = t.get("fill")
        if fill and fill != "none":
            fc = with_alpha(rgba(t["fillcolor"]) if t.get("fillcolor") else with_alpha(color, 0.5), alpha)
            if fill == "toself":
                ax.fill(x, y, color=fc, lw=0, zorder=z)
            elif fill in ("tozeroy", "tonexty"):
                base = prev[1] if fill == "tonexty" and prev[0] == x else [0.0] * n
                if fill == "tonexty" and prev[0] != x:
                    self.skip("fill=tonexty between traces of different x")
                else:
                    ax.fill_between(x, base, y, color=fc, lw=0, zorder=z)
            else:
                self.skip(f"fill={fill}")
            handle = Patch(facecolor=fc, edgecolor=color if lw > 0 and "lines" in mode else "none")
        prev[0][:], prev[1][:] = x, y
        show_line = "lines" in mode and lw > 0
        if show_line:
            ax.plot(x, y, color=with_alpha(color, alpha), lw=lw, ls=ls, zorder=z)
        msym = _SYMBOL.get(str(marker.get("symbol", "circle")).replace("-dot", ""), "o")
        msize = float(marker.get("size", 6) if not isinstance(marker.get("size"), list) else 6) * PT
        msize *= 1.4 if msym == "*" else 1.0  # matplotlib's star is smaller than plotly's at one size
        if "markers" in mode:
            mc = marker.get("color")
            mcol = [rgba(c) for c in values(mc)] if isinstance(mc, (list, tuple)) else with_alpha(color, marker.get("opacity"))
            ax.scatter(x, y, s=msize ** 2, c=[mcol] if isinstance(mcol, tuple) else mcol, marker=msym,
                       alpha=alpha, linewidths=0, zorder=z + 1e-4)
        self.error_bars(p, t, x, y, color, z)
        if "text" in mode:
            self.point_labels(p, t, x, y)
        if handle is None:
            handle = Line2D([], [], color=color, lw=lw if show_line else 0, ls=ls,
                            marker=msym if "markers" in mode else None, markersize=msize, markeredgewidth=0)
        return handle

    def error_bars(self, p: _Panel, t: dict, x: list, y: list, color: tuple, z: float) -> None:
        """Error bars drawn as plotly.js does: a segment from value - down to value + up (a negative
        length, from an interval that misses its point, is drawn as given), capped at both ends."""
        from matplotlib.collections import LineCollection

        for letter, vals, other in (("y", y, x), ("x", x, y)):
            e = t.get(f"error_{letter}") or {}
            if not e or e.get("visible") is False or not any(k in e for k in ("array", "value")):
                continue
            up, down = _error_sizes(e, vals)
            ecol = rgba(e.get("color"), None) if e.get("color") else color
            lw = float(e.get("thickness", 2)) * PT
            segs, tips = [], []
            for v, o, u, dn in zip(vals, other, up, down):
                if not (math.isfinite(v) and math.isfinite(o)) or (u == 0 and dn == 0):
                    continue
                a, b = v - dn, v + u
                segs.append([(o, a), (o, b)] if letter == "y" else [(a, o), (b, o)])
                tips += [(o, a), (o, b)] if letter == "y" else [(a, o), (b, o)]
            if not segs:
                continue
            p.ax.add_collection(LineCollection(segs, colors=[ecol], linewidths=lw, zorder=z), autolim=True)
            cap = "_" if letter == "y" else "|"
            p.ax.plot([q[0] for q in tips], [q[1] for q in tips], ls="none", marker=cap, color=ecol,
                      markersize=2 * float(e.get("width", 4)) * PT, markeredgewidth=lw, zorder=z)

    def point_labels(self, p: _Panel, t: dict, x: list, y: list) -> None:
        texts = values(t.get("text"))
        where = t.get("textposition") or "middle center"
        font = t.get("textfont") or {}
        for j, (a, b) in enumerate(zip(x, y)):
            if j >= len(texts) or not math.isfinite(a) or not math.isfinite(b):
                continue
            pos = where[j] if isinstance(where, list) else where
            va_word, _, ha_word = str(pos).partition(" ")
            dy = {"top": 5, "bottom": -5}.get(va_word, 0)
            dx = {"left": -5, "right": 5}.get(ha_word, 0)
            p.ax.annotate(plain_text(texts[j]), (a, b), xytext=(dx * PT, dy * PT), textcoords="offset points",
                          ha={"left": "right", "right": "left"}.get(ha_word, "center"),
                          va={"top": "bottom", "bottom": "top"}.get(va_word, "center"),
                          fontsize=float(font.get("size", self.font_px)) * PT,
                          color=rgba(font.get("color"), None) if font.get("color") else self.font_color, zorder=5)

    def draw_box(self, p: _Panel, t: dict, i: int, prev: Any) -> Any:
        from matplotlib.patches import Patch

        vert = _orient(t) == "v"
        data = floats(t.get("y") if vert else t.get("x"))
        where = values(t.get("x") if vert else t.get("y"))
        groups: dict[float, list[float]] = {}
        if where:  # one box per distinct position
            for w, v in zip(self.pos(p, "x" if vert else "y", where), data):
                groups.setdefault(w, []).append(v)
        else:
            at = t.get("x0" if vert else "y0", t.get("name", f"trace {i}"))
            groups[self.pos(p, "x" if vert else "y", [at])[0]] = data
        color = self.trace_color(t, i)
        fill = rgba(t["fillcolor"]) if t.get("fillcolor") else with_alpha(color, 0.5)
        for at, vals in groups.items():
            vals = [v for v in vals if math.isfinite(v)]
            if not vals:
                continue
            p.ax.boxplot([vals], positions=[at], widths=0.5, **_box_orientation(vert), patch_artist=True, manage_ticks=False,
                         whis=1.5, showfliers=t.get("boxpoints", "outliers") is not False,
                         boxprops=dict(facecolor=fill, edgecolor=color, lw=2 * PT),
                         medianprops=dict(color=color, lw=2 * PT), whiskerprops=dict(color=color, lw=2 * PT),
                         capprops=dict(color=color, lw=2 * PT),
                         flierprops=dict(marker="o", markerfacecolor=color, markeredgewidth=0, markersize=6 * PT),
                         zorder=2.5 + i * 1e-3)
        return Patch(facecolor=fill, edgecolor=color)

    def draw_heatmap(self, p: _Panel, t: dict, i: int, prev: Any) -> Any:
        import numpy as np
        from matplotlib.colors import LinearSegmentedColormap

        z = np.array([floats(row) for row in values(t.get("z"))], dtype=float)
        if z.ndim != 2 or z.size == 0:
            return None
        if t.get("transpose"):
            z = z.T
        ny, nx = z.shape
        xe = _edges(self.pos(p, "x", values(t.get("x"))) if t.get("x") is not None else None, nx, t.get("x0", 0), t.get("dx", 1))
        ye = _edges(self.pos(p, "y", values(t.get("y"))) if t.get("y") is not None else None, ny, t.get("y0", 0), t.get("dy", 1))
        scale = _colorscale(t.get("colorscale") or (self.lay("colorscale") or {}).get("sequential") or "Plasma")
        if t.get("reversescale"):
            scale = [[1 - s, c] for s, c in reversed(scale)]
        cmap = LinearSegmentedColormap.from_list("plotly", [(float(s), rgba(c)) for s, c in scale])
        cmap = cmap.with_extremes(bad=(0, 0, 0, 0))  # a missing value shows the background
        finite = z[np.isfinite(z)]
        vmin = t.get("zmin", float(finite.min()) if finite.size else 0.0)
        vmax = t.get("zmax", float(finite.max()) if finite.size else 1.0)
        mesh = p.ax.pcolormesh(xe, ye, np.ma.masked_invalid(z), cmap=cmap, vmin=vmin, vmax=vmax, zorder=1)
        p.ax.set_xlim(xe[0], xe[-1])
        p.ax.set_ylim(ye[0], ye[-1])
        p.ax.grid(False)
        if t.get("showscale", True) is not False:
            cb = self.fig.colorbar(mesh, ax=p.ax, pad=0.01, aspect=max(8, 30 * (p.ax.get_position().height or 1)))
            cb.ax.tick_params(labelsize=self.font_px * PT, colors=self.font_color, length=0)
            cb.ax.yaxis.set_major_formatter(_tick_formatter())
            cb.outline.set_visible(False)
            cb_title = title_text((t.get("colorbar") or {}).get("title"))
            if cb_title:
                cb.ax.set_title(cb_title, fontsize=self.font_px * PT, color=self.font_color, loc="left")
        return None

    def draw_bars(self, p: _Panel, items: list[tuple[int, dict]]) -> list[tuple[int, dict, Any]]:
        """Bars and histograms of one subplot, laid out by ``barmode`` like plotly.js."""
        from matplotlib.patches import Patch

        mode = self.lay("barmode") or "group"
        all_hist = all(t.get("type") == "histogram" for _, t in items)
        gap = self.lay("bargap")
        gap = float(gap) if gap is not None else (0.0 if all_hist else 0.2)
        ggap = float(self.lay("bargroupgap") or 0.0)
        series = []  # (i, trace, horizontal, positions, lengths, width or None)
        hist_data: dict[bool, list[float]] = {}
        for _, t in items:
            if t.get("type") == "histogram":
                horiz = t.get("x") is None and t.get("y") is not None
                hist_data.setdefault(horiz, []).extend(floats(t.get("y") if horiz else t.get("x")))

        def first(key: str) -> Any:  # histograms of one subplot share their bins, as in plotly
            return next((t[key] for _, t in items if t.get("type") == "histogram" and t.get(key)), None)

        edges = {h: bin_edges(v, first("ybins" if h else "xbins"), first("nbinsy" if h else "nbinsx"))
                 for h, v in hist_data.items()}
        for i, t in items:
            if t.get("type") == "histogram":
                import numpy as np

                horiz = t.get("x") is None and t.get("y") is not None
                data = [v for v in floats(t.get("y") if horiz else t.get("x")) if math.isfinite(v)]
                e = np.asarray(edges[horiz])
                counts, _ = np.histogram(data, bins=e)
                counts = counts.astype(float)
                norm = t.get("histnorm") or ""
                total = max(len(data), 1)
                if norm == "percent":
                    counts *= 100 / total
                elif norm == "probability":
                    counts /= total
                elif norm in ("density", "probability density"):
                    counts /= np.diff(e) * (total if norm == "probability density" else 1)
                series.append((i, t, horiz, ((e[:-1] + e[1:]) / 2).tolist(), counts.tolist(), float(np.diff(e).min())))
            else:
                horiz = t.get("orientation") == "h"
                pos_raw, len_raw = (t.get("y"), t.get("x")) if horiz else (t.get("x"), t.get("y"))
                lens = floats(len_raw)
                where = self.pos(p, "y" if horiz else "x", values(pos_raw) if pos_raw is not None else list(range(len(lens))))
                series.append((i, t, horiz, where, lens, None))
        spots = sorted({w for s in series if s[5] is None for w in s[3] if math.isfinite(w)})
        step = min((b - a for a, b in zip(spots, spots[1:])), default=1.0) or 1.0
        step = min([step] + [s[5] for s in series if s[5] is not None])
        grouped = mode == "group" and len(series) > 1
        out = []
        base_pos: dict[tuple[bool, float], float] = {}
        base_neg: dict[tuple[bool, float], float] = {}
        for k, (i, t, horiz, where, lens, width) in enumerate(series):
            full = (width or step) * (1 - gap)
            w = full * (1 - ggap) / len(series) if grouped else full
            if t.get("width") is not None:
                w = float(t["width"])
            shift = (-full / 2 + (k + 0.5) * full / len(series)) if grouped else 0.0
            color = self.trace_color(t, i)
            mcol = (t.get("marker") or {}).get("color")
            colors = [rgba(c) for c in values(mcol)] if isinstance(mcol, (list, tuple)) else [color] * len(lens)
            alpha = t.get("opacity")
            colors = [with_alpha(c, alpha) for c in colors]
            starts = []
            for w_, v in zip(where, lens):
                if mode in ("stack", "relative") and math.isfinite(v):
                    book = base_pos if v >= 0 else base_neg
                    starts.append(book.get((horiz, w_), 0.0))
                    book[(horiz, w_)] = starts[-1] + v
                else:
                    starts.append(0.0)
            mline = (t.get("marker") or {}).get("line") or {}
            edge = dict(edgecolor=rgba(mline.get("color"), None) if mline.get("color") else "none",
                        linewidth=float(mline.get("width", 0)) * PT)
            at = [w_ + shift for w_ in where]
            n = min(len(at), len(lens), len(colors))
            if horiz:
                p.ax.barh(at[:n], lens[:n], height=w, left=starts[:n], color=colors[:n], zorder=2 + i * 1e-3, **edge)
            else:
                p.ax.bar(at[:n], lens[:n], width=w, bottom=starts[:n], color=colors[:n], zorder=2 + i * 1e-3, **edge)
            out.append((i, t, Patch(facecolor=colors[0] if colors else color)))
        return out

    # ---- axes, shapes, annotations
    def style_axes(self) -> None:
        from matplotlib.ticker import FixedLocator, FuncFormatter, MultipleLocator

        bg = rgba(self.lay("plot_bgcolor"), "white")
        for p in self.panels.values():
            ax = p.ax
            ax.set_facecolor(bg)
            ax.set_axisbelow(True)
            for spine in ax.spines.values():
                spine.set_visible(False)
            for letter, lay, typ, cats in (("x", p.xlay, p.xtype, p.xcats), ("y", p.ylay, p.ytype, p.ycats)):
                axis = ax.xaxis if letter == "x" else ax.yaxis
                if typ == "log":
                    from matplotlib.ticker import LogFormatter

                    (ax.set_xscale if letter == "x" else ax.set_yscale)("log")
                    axis.set_major_formatter(_tick_formatter(LogFormatter(labelOnlyBase=False)))
                    axis.set_minor_formatter(_tick_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6))))
                elif typ == "linear":
                    axis.set_major_formatter(_tick_formatter())
                rng = lay.get("range")
                if rng and len(rng) == 2 and None not in rng:
                    lo, hi = (10 ** float(rng[0]), 10 ** float(rng[1])) if typ == "log" else (float(rng[0]), float(rng[1]))
                    (ax.set_xlim if letter == "x" else ax.set_ylim)(lo, hi)
                elif lay.get("autorange") == "reversed":
                    (ax.invert_xaxis if letter == "x" else ax.invert_yaxis)()
                if typ == "category":
                    axis.set_major_locator(FixedLocator(list(range(len(cats)))))
                    axis.set_major_formatter(FuncFormatter(lambda v, _, c=cats: c[int(round(v))] if 0 <= round(v) < len(c) else ""))
                    if letter == "x" and sum(len(c) for c in cats) * self.font_px * 0.6 > ax.get_position().width * self.fig.bbox.width:
                        for lab in ax.get_xticklabels():
                            lab.set_rotation(30)
                            lab.set_ha("right")
                    (ax.set_xlim if letter == "x" else ax.set_ylim)(-0.5, len(cats) - 0.5) if cats and not rng else None
                elif lay.get("tickvals") is not None:
                    tv = floats(lay["tickvals"])
                    tt = [plain_text(s) for s in values(lay.get("ticktext"))] or None
                    axis.set_major_locator(FixedLocator(tv))
                    if tt:
                        axis.set_major_formatter(FuncFormatter(lambda v, _, tv=tv, tt=tt: tt[tv.index(v)] if v in tv else ""))
                elif typ == "linear" and isinstance(lay.get("dtick"), (int, float)) and lay["dtick"] > 0:
                    axis.set_major_locator(MultipleLocator(float(lay["dtick"]), offset=float(lay.get("tick0") or 0)))
                if lay.get("showgrid", True) is not False:
                    ax.grid(True, axis=letter, color=rgba(lay.get("gridcolor"), "white"), lw=1 * PT * 1.4)
                if lay.get("showticklabels") is False or lay.get("visible") is False:
                    axis.set_ticklabels([])
                t = title_text(lay.get("title"))
                if t:
                    (ax.set_xlabel if letter == "x" else ax.set_ylabel)(t, fontsize=self.font_px * 1.1 * PT, color=self.font_color)
            ax.tick_params(which="both", labelsize=self.font_px * PT, colors=self.font_color, length=0, pad=3)

    def zero_lines(self) -> None:
        """plotly's thicker line at 0 on a linear axis whose range holds it."""
        for p in self.panels.values():
            for letter, lay, typ in (("x", p.xlay, p.xtype), ("y", p.ylay, p.ytype)):
                lo, hi = sorted(p.ax.get_xlim() if letter == "x" else p.ax.get_ylim())
                if typ == "linear" and lay.get("zeroline", True) is not False and lo < 0 < hi:
                    kw = dict(color=rgba(lay.get("zerolinecolor"), "#444"), lw=float(lay.get("zerolinewidth", 1)) * PT, zorder=0.7)
                    (p.ax.axvline if letter == "x" else p.ax.axhline)(0, **kw)

    def panel_of(self, xref: str, yref: str) -> _Panel | None:
        x = xref.split(" ")[0]
        y = yref.split(" ")[0]
        for p in self.panels.values():
            if (x == "paper" or p.xname == x) and (y == "paper" or p.yname == y) and (x, y) != ("paper", "paper"):
                return p
        return None

    def transform(self, p: _Panel, xref: str, yref: str) -> Any:
        """Plotly refs as a matplotlib transform: data (``x2``), axis fraction (``x2 domain``); a
        ``paper`` ref beside an axis ref is read as that subplot's fraction (approximate)."""
        from matplotlib.transforms import blended_transform_factory

        tx = p.ax.transData if " domain" not in xref and xref != "paper" else p.ax.transAxes
        ty = p.ax.transData if " domain" not in yref and yref != "paper" else p.ax.transAxes
        return blended_transform_factory(tx, ty)

    def draw_shapes(self, paper: bool) -> None:
        from matplotlib.patches import Rectangle

        defaults = self.tlayout.get("shapedefaults") or {}
        for s in self.layout.get("shapes") or []:
            s = merged(defaults, s)
            xref, yref = s.get("xref") or "x", s.get("yref") or "y"
            if (xref == yref == "paper") != paper:
                continue
            kind = s.get("type", "rect" if "x0" in s else "path")
            if kind not in ("line", "rect") or s.get("visible") is False:
                self.skip(f"{kind} shape")
                continue
            if paper:
                tr, p = self.paper_transform(), None
                x0, x1, y0, y1 = (floats([s.get(k)])[0] for k in ("x0", "x1", "y0", "y1"))
            else:
                p = self.panel_of(xref, yref)
                if p is None:
                    self.skip("shape on a missing axis")
                    continue
                tr = self.transform(p, xref, yref)
                x0, x1 = (self.coord(p, "x", s.get(k)) if "domain" not in xref and xref != "paper" else floats([s.get(k)])[0]
                          for k in ("x0", "x1"))
                y0, y1 = (self.coord(p, "y", s.get(k)) if "domain" not in yref and yref != "paper" else floats([s.get(k)])[0]
                          for k in ("y0", "y1"))
            line = s.get("line") or {}
            lw = float(line.get("width", 2)) * PT
            lcol = rgba(line.get("color"), "#444")
            z = 0.8 if s.get("layer") == "below" else 4
            alpha = float(s.get("opacity", 1))
            host = p.ax if p is not None else self.fig
            if kind == "line":
                from matplotlib.lines import Line2D

                host.add_artist(Line2D([x0, x1], [y0, y1], transform=tr, color=with_alpha(lcol, alpha), lw=lw,
                                       ls=_DASH.get(line.get("dash") or "solid", "-"), zorder=z))
                if p is not None:  # data coordinates widen the axis range, as in plotly
                    self.expand(p, xref, yref, [x0, x1], [y0, y1])
            else:
                fc = with_alpha(rgba(s.get("fillcolor"), None) if s.get("fillcolor") else (0, 0, 0, 0), alpha)
                host.add_artist(Rectangle((min(x0, x1), min(y0, y1)), abs(x1 - x0), abs(y1 - y0), transform=tr,
                                          facecolor=fc, edgecolor=with_alpha(lcol, alpha) if lw > 0 else "none",
                                          lw=lw, ls=_DASH.get(line.get("dash") or "solid", "-"), zorder=z))
                if p is not None:
                    self.expand(p, xref, yref, [x0, x1], [y0, y1])

    def expand(self, p: _Panel, xref: str, yref: str, xs: list[float], ys: list[float]) -> None:
        """Widen a subplot's data limits to a shape given in data coordinates (plotly's autorange does)."""
        if " domain" not in xref and xref != "paper":
            p.ax.update_datalim([(x, 0.0) for x in xs if math.isfinite(x)], updatey=False)
        if " domain" not in yref and yref != "paper":
            p.ax.update_datalim([(0.0, y) for y in ys if math.isfinite(y)], updatex=False)
        p.ax.autoscale_view()

    def subplot_titles(self) -> list[dict]:
        """Set make_subplots' title annotations as the subplots' titles; return the other annotations."""
        rest = []
        for a in self.layout.get("annotations") or []:
            p = self.title_panel(a) if a.get("xref") == "paper" and a.get("yref") == "paper" else None
            if p is None:
                rest.append(a)
                continue
            size = float((a.get("font") or {}).get("size") or self.font_px * 1.2) * PT
            p.subtitle = p.ax.set_title(plain_text(a.get("text")), fontsize=size, color=self.font_color)
        return rest

    def title_panel(self, a: dict) -> _Panel | None:
        if a.get("showarrow", True) or a.get("yanchor") != "bottom":
            return None
        for p in self.panels.values():
            xd = self.layout.get(_axis_key(p.xname), {}).get("domain") or (0, 1)
            yd = self.layout.get(_axis_key(p.yname), {}).get("domain") or (0, 1)
            if abs(float(a.get("x", -9)) - (xd[0] + xd[1]) / 2) < 1e-6 and abs(float(a.get("y", -9)) - yd[1]) < 1e-6:
                return p
        return None

    def paper_transform(self) -> Any:
        """Paper coordinates (0-1 over the area the subplots span) in figure pixels, after layout."""
        from matplotlib.transforms import Affine2D, Bbox, BboxTransformTo

        if not self.panels:
            return self.fig.transFigure
        boxes = [p.ax.get_position() for p in self.panels.values()]
        area = Bbox.union(boxes)
        return Affine2D().scale(area.width, area.height).translate(area.x0, area.y0) + BboxTransformTo(self.fig.bbox)

    def draw_annotations(self, notes: list[dict]) -> None:
        defaults = self.tlayout.get("annotationdefaults") or {}
        for a in notes:
            a = merged(defaults, a)
            if a.get("visible") is False:
                continue
            xref, yref = a.get("xref") or "x", a.get("yref") or "y"
            font = a.get("font") or {}
            text = plain_text(a.get("text"))
            if not text:
                continue
            if xref == yref == "paper":
                tr, x, y, p = self.paper_transform(), float(a.get("x", 0.5)), float(a.get("y", 0.5)), None
            else:
                p = self.panel_of(xref, yref)
                if p is None:
                    self.skip("annotation on a missing axis")
                    continue
                tr = self.transform(p, xref, yref)
                data_x = " domain" not in xref and xref != "paper"
                data_y = " domain" not in yref and yref != "paper"
                x = self.coord(p, "x", a.get("x"), annotation=True) if data_x else float(a.get("x", 0.5))
                y = self.coord(p, "y", a.get("y"), annotation=True) if data_y else float(a.get("y", 0.5))
                if (data_x and not _within(x, p.ax.get_xlim())) or (data_y and not _within(y, p.ax.get_ylim())):
                    continue  # plotly hides an annotation whose point lies outside its axes
            ha = {"left": "left", "right": "right"}.get(a.get("xanchor"), "center")
            va = {"top": "top", "bottom": "bottom"}.get(a.get("yanchor"), "center")
            kw = dict(fontsize=float(font.get("size") or self.font_px) * PT, ha=ha, va=va, zorder=6,
                      color=rgba(font.get("color"), None) if font.get("color") else self.font_color)
            host = p.ax if p is not None else self.fig
            if a.get("showarrow", True):
                host.annotate(text, (x, y), xycoords=tr, xytext=(float(a.get("ax", -10)) * PT, -float(a.get("ay", -30)) * PT),
                              textcoords="offset points", arrowprops=dict(arrowstyle="-", color=rgba(a.get("arrowcolor"), "#444"),
                                                                          lw=float(a.get("arrowwidth") or 1) * PT), **kw)
            else:
                host.text(x, y, text, transform=tr, **kw)

    def fit_subplot_titles(self) -> None:
        """Subplot titles wider than their subplot (plotly lets them overlap): all get one smaller
        size (down to 7.5 pt), and a title still too wide is wrapped onto two lines."""
        renderer = self.fig.canvas.get_renderer()
        titled = [p for p in self.panels.values() if p.subtitle is not None and p.subtitle.get_text()]
        if not titled:
            return
        room = {id(p): p.ax.get_window_extent(renderer).width * 1.05 for p in titled}
        size = min(p.subtitle.get_fontsize() for p in titled)
        for p in titled:
            w = p.subtitle.get_window_extent(renderer).width
            if w > room[id(p)]:
                size = min(size, p.subtitle.get_fontsize() * room[id(p)] / w)
        size = max(size, 7.5)
        for p in titled:
            p.subtitle.set_fontsize(size)
            if p.subtitle.get_window_extent(renderer).width > room[id(p)]:
                p.subtitle.set_text(_two_lines(p.subtitle.get_text()))

    def title(self) -> None:
        t = self.lay("title") or {}
        raw = t.get("text") if isinstance(t, dict) else t
        text = plain_text(raw)
        if not text:
            return
        size = float(((t.get("font") if isinstance(t, dict) else None) or {}).get("size") or self.font_px * 17 / 12) * PT
        col = text_color(raw)
        x = float(t.get("x", 0.05) if isinstance(t, dict) else 0.05)
        self.fig.suptitle(text, x=min(x, 0.02), ha="left", fontsize=size,
                          color=rgba(col, None) if col else self.font_color, fontweight="bold" if col else "normal")

    def fit_title(self) -> None:
        """Wrap the title to the width left of a legend (the legend sits beside it, top right)."""
        import textwrap

        t = self.fig._suptitle
        if t is None:
            return
        renderer = self.fig.canvas.get_renderer()
        right = self.fig.bbox.width
        for leg in self.fig.legends:
            right = min(right, leg.get_window_extent(renderer).x0)
        room = right - t.get_window_extent(renderer).x0 - 6
        text = t.get_text()
        chars = max(len(s) for s in text.split("\n"))
        while t.get_window_extent(renderer).width > room and chars > 20:
            chars = int(chars * 0.9)
            t.set_text("\n".join(w for line in text.split("\n") for w in textwrap.wrap(line, chars) or [""]))

    def legend(self, handles: list[tuple[Any, str]]) -> None:
        show = self.lay("showlegend")
        if not handles or (show is False) or (show is None and len(handles) < 2):
            return
        leg = self.lay("legend") or {}
        kw = dict(fontsize=self.font_px * PT, frameon=False, labelcolor=self.font_color, handlelength=1.8)
        if leg.get("orientation") == "h":
            self.fig.legend([h for h, _ in handles], [n for _, n in handles], loc="outside lower center",
                            ncols=min(len(handles), 6), **kw)
        else:
            self.fig.legend([h for h, _ in handles], [n for _, n in handles], loc="outside right upper", **kw)

    def footnote(self) -> None:
        if self.skipped:
            self.fig.supxlabel("static copy: not drawn: " + "; ".join(self.skipped), x=0.01, ha="left",
                               fontsize=7, color="#777")

    def draw(self) -> Any:
        traces = list(self.d.get("data") or [])
        self.make_panels(traces)
        self.type_axes(traces)
        handles = self.draw_traces(traces)
        self.style_axes()
        self.draw_shapes(paper=False)
        notes = self.subplot_titles()
        self.title()
        self.legend(handles)
        self.footnote()
        if not self.panels and not any(t.get("type") == "table" for t in traces) and not traces:
            self.fig.text(0.5, 0.5, "(empty figure)", ha="center", va="center", color="#777")
        self.zero_lines()
        self.fig.draw_without_rendering()
        self.fit_subplot_titles()
        self.fit_title()
        self.fig.draw_without_rendering()
        self.fig.set_layout_engine("none")  # freeze: annotations below do not move the subplots
        self.draw_shapes(paper=True)
        self.draw_annotations(notes)
        return self.fig


def _number(v: float) -> str:
    """A tick label as plotly writes one: plain decimals, no offset, no "x 10^k"."""
    if v == 0:
        return "0"
    return f"{v:.6g}".replace("e-0", "e-").replace("e+0", "e+")


def _tick_formatter(inner: Any = None) -> Any:
    """A matplotlib Formatter printing :func:`_number`; with ``inner`` (a LogFormatter) only the
    ticks ``inner`` labels get a label (all decades; 2 and 5 too when the axis spans few)."""
    from matplotlib.ticker import Formatter

    class _Plain(Formatter):
        def set_locs(self, locs):
            super().set_locs(locs)
            if inner is not None:
                inner.set_axis(self.axis)
                inner.set_locs(locs)

        def __call__(self, v, pos=None):
            if inner is not None and not inner(v, pos):
                return ""
            return _number(v)

    return _Plain()


def _orient(t: dict) -> str:
    if t.get("orientation") in ("h", "v"):
        return t["orientation"]
    return "h" if t.get("x") is not None and t.get("y") is None else "v"


def _two_lines(text: str) -> str:
    """``text`` broken at the space nearest its middle."""
    spaces = [j for j, ch in enumerate(text) if ch == " "]
    if "\n" in text or not spaces:
        return text
    j = min(spaces, key=lambda k: abs(k - len(text) / 2))
    return text[:j] + "\n" + text[j + 1:]


def _box_orientation(vert: bool) -> dict:
    """boxplot's orientation keyword: ``orientation`` from matplotlib 3.10 on, ``vert`` before."""
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    if (major, minor) >= (3, 10):
        return {"orientation": "vertical" if vert else "horizontal"}
    return {"vert": vert}


def _within(v: float, lim: tuple[float, float]) -> bool:
    lo, hi = sorted(lim)
    return math.isfinite(v) and lo - 1e-9 * abs(hi - lo) <= v <= hi + 1e-9 * abs(hi - lo)


def _error_sizes(e: dict, vals: list[float]) -> tuple[list[float], list[float]]:
    """(up, down) error bar lengths of a plotly ``error_x``/``error_y`` spec."""
    n = len(vals)
    kind = e.get("type") or ("data" if "array" in e else "percent")
    sym = e.get("symmetric", not ("arrayminus" in e or "valueminus" in e))

    def one(arr_key: str, val_key: str) -> list[float]:
        if kind == "data":
            a = floats(e.get(arr_key))
            return [a[j] if j < len(a) and math.isfinite(a[j]) else 0.0 for j in range(n)]
        v = float(e.get(val_key, 10 if kind == "percent" else 0))
        if kind == "percent":
            return [abs(x) * v / 100 if math.isfinite(x) else 0.0 for x in vals]
        if kind == "sqrt":
            return [math.sqrt(abs(x)) if math.isfinite(x) else 0.0 for x in vals]
        return [v] * n

    up = one("array", "value")
    down = up if sym else one("arrayminus", "valueminus")
    return up, down


def _edges(centers: list[float] | None, n: int, start: Any, step: Any) -> list[float]:
    """Cell edges for ``n`` heatmap cells from their centres (or ``x0``/``dx``)."""
    if not centers or len(centers) < n:
        c = [float(start) + float(step) * j for j in range(n)]
    else:
        c = [float(v) for v in centers[:n]]
    if len(c) == 1:
        return [c[0] - 0.5, c[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(c, c[1:])]
    return [c[0] - (mids[0] - c[0])] + mids + [c[-1] + (c[-1] - mids[-1])]


def _colorscale(cs: Any) -> list[list]:
    """A plotly colorscale (a name such as "Magma", or ``[[0, colour], ...]``) as pairs."""
    if isinstance(cs, str):
        import plotly.colors as pc

        return [list(p) for p in pc.get_colorscale(cs)]
    return [list(p) for p in cs]


def draw(fig: Any, *, width: int | None = None, height: int | None = None) -> Any:
    """The figure drawn as a matplotlib ``Figure`` (not attached to pyplot: the notebook's own
    matplotlib state is untouched). Size: ``width``/``height`` px, else the layout's, else
    :data:`WIDTH` x :data:`HEIGHT`."""
    d = figure_dict(fig)
    lay = d.get("layout") or {}
    w = int(width or lay.get("width") or WIDTH)
    h = int(height or lay.get("height") or HEIGHT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "constrained layout not applied" on tiny sizes
        return _Drawer(d, w, h).draw()


def to_png(fig: Any, *, width: int | None = None, height: int | None = None, scale: float = 1.0,
           colors: int | None = 256) -> bytes:
    """PNG bytes of the figure: ``width x height`` px (see :func:`draw`) times ``scale``.

    ``colors``: the image is stored with a palette of at most that many colours (a plot has few;
    the antialiased edges lose nothing visible), about 3.5x smaller than full RGB; None keeps RGB.

    Example:
        >>> import plotly.graph_objects as go
        >>> png = to_png(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])), width=400, height=300)
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    from PIL import Image

    f = draw(fig, width=width, height=height)
    dpi = DPI * scale
    size = (round(f.get_figwidth() * dpi), round(f.get_figheight() * dpi))
    raw = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        f.savefig(raw, format="rgba", dpi=dpi, facecolor=f.get_facecolor())
    img = Image.frombuffer("RGBA", size, raw.getvalue(), "raw", "RGBA", 0, 1).convert("RGB")
    if colors:
        img = img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def mimebundle(fig: Any, *, width: int | None = None, height: int | None = None, scale: float = 1.0) -> dict[str, str]:
    """The static copy of a figure as an output bundle: ``text/html`` for a figure made only of
    tables, else ``image/png`` (base64)."""
    d = figure_dict(fig)
    traces = d.get("data") or []
    if traces and all(t.get("type") == "table" for t in traces):
        return {"text/html": table_html(d)}
    return {"image/png": base64.b64encode(to_png(d, width=width, height=height, scale=scale)).decode("ascii")}


def _renderer_base():
    from plotly.io._base_renderers import MimetypeRenderer

    return MimetypeRenderer


class StaticRenderer(_renderer_base()):
    """A plotly mimetype renderer adding the static copy (see :func:`mimebundle`).

    Combined with plotly's own (``"plotly_mimetype+steerheal_static"``), ``fig.show()`` emits one
    output holding both the interactive JSON and the static copy. A figure it cannot draw gets
    a one-line text note instead (and a warning), never a failed cell.
    """

    def __init__(self, width: int | None = None, height: int | None = None, scale: float = 1.0) -> None:
        self.width = width
        self.height = height
        self.scale = scale

    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        try:
            return mimebundle(fig_dict, width=self.width, height=self.height, scale=self.scale)
        except Exception as e:  # a fallback must not fail the stage that shows the figure
            warnings.warn(f"figstatic: no static copy of this figure ({type(e).__name__}: {e})", stacklevel=2)
            return {"text/plain": f"(no static copy of this figure: {type(e).__name__}: {e})"}


def register() -> str:
    """Register :class:`StaticRenderer` with plotly as ``steerheal_static``; return the renderer
    string that stores the interactive figure and its static copy together."""
    import plotly.io as pio

    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = StaticRenderer()
    return DEFAULT_RENDERERS


# ------------------------------------------------------------------ widgets
class WithStatic:
    """An ipywidget displayed with a static HTML copy in the same output bundle.

    The driver saves executed notebooks without widget state (``store_widget_state=False``), so
    nbconvert, GitHub and nbviewer skip the widget view and show the ``text/html`` entry; in
    JupyterLab, re-running the cell with a kernel draws the live widget (it ranks above HTML).
    Attribute access goes to the widget.

    Example:
        >>> WithStatic(W.VBox([]), "<p>kept rows ...</p>")   # doctest: +SKIP
    """

    def __init__(self, widget: Any, static_html: str) -> None:
        self.widget, self.static_html = widget, static_html

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["widget"], name)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data = {**data, "text/html": self.static_html}
        return (data, bundle[1]) if isinstance(bundle, tuple) else data


def with_static(widget: Any, static_html: str) -> Any:
    """``widget`` wrapped in :class:`WithStatic` (``None`` stays ``None``: ipywidgets missing)."""
    return None if widget is None else WithStatic(widget, static_html)


def rows_html(rows: list[dict], cols: list[str], *, caption: str = "", clip: int = 600) -> str:
    """Rows as an escaped static HTML table (class ``steerheal-static-table``), long cells clipped."""
    def cell(v: Any) -> str:
        s = "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
        s = s if len(s) <= clip else s[:clip] + "…"
        return html.escape(s).replace("\n", "<br>")

    cap = f"<caption style=\"caption-side:top;text-align:left;font-weight:bold\">{html.escape(caption)}</caption>" \
        if caption else ""
    head = "".join(f"<th style=\"text-align:left\">{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td style=\"text-align:left;vertical-align:top\">{cell(r.get(c))}</td>"
                                    for c in cols) + "</tr>" for r in rows)
    return f"<table class=\"steerheal-static-table\">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def browser_static(widget: Any, rows: list[dict], per_reason: int = 3) -> Any:
    """03's row browser with a static copy: per verdict (keep first, then each drop reason), its
    count and up to ``per_reason`` example rows with their main scores."""
    from collections import Counter

    rows = list(rows)
    counts = Counter(r.get("reason", "?") for r in rows)
    order = sorted(counts, key=lambda k: (k != "keep", -counts[k], k))
    parts = [f"<p><b>Rows by verdict</b> (static copy of the browser: up to {per_reason} per verdict; "
             "every row is in completions.jsonl): " + ", ".join(f"{html.escape(k)} {counts[k]}" for k in order) + "</p>"]
    cols = ["id", "reason", "tail_ppl", "ngram_repeat", "prompt", "completion"]
    for k in order:
        sel = [r for r in rows if r.get("reason", "?") == k][:per_reason]
        parts.append(rows_html(sel, cols, caption=f"{k}: {len(sel)} of {counts[k]}", clip=400))
    return with_static(widget, "\n".join(parts))
