"""The trait axis a run steers along, from config alone: its name and side labels, its probe file,
the two foundations on the report's map and in the headline columns.

The persona pair (``pos_persona``, ``neg_persona``) makes the vector; the axis knobs say how the
eval reads it:

- ``axis_name`` and ``axis_labels`` ([pos side, neg side]) label the probe's log-odds in the
  eval's summary, ``metrics.csv`` and the report;
- ``axis_probe``: a JSONL file of two-option items (empty: the shipped care-vs-authority probe;
  a bare file name that is not a local file: a file shipped in ``steerheal_utils/data/``, e.g.
  ``love_probe.jsonl``). Schema: ``id``, ``situation`` and either ``pos_option``/``neg_option``
  or the shipped file's ``care_option``/``authority_option`` (care is the pos side). Rows are
  returned in the shipped schema, which the probe scorer reads;
- ``axis_prompts``: 02's generation prompt pool, JSONL of ``id``, ``text`` (and ``domain``)
  (empty: the shipped care-vs-authority dilemmas; a bare name as for ``axis_probe``, e.g.
  ``love_prompts.jsonl``). The prompt-distillation arm and the online loop sample from it too;
- ``axis_map``: [x, y] foundations of the report's map (default ``[Authority, Care]``); their
  ``*_nats`` join ``axis_logodds`` and ``coherence`` in the headline (the metrics read against the
  control band, with their deltas to base).

The eval records the axis in ``eval.json`` (``axis``); the report reads it from there, so a run's
report labels what that run measured (an eval.json without it is the default axis).

Example:
    >>> from steerheal_utils.config import Config
    >>> ax = from_config(Config())
    >>> ax.headline, ax.is_default
    (('axis_logodds', 'care_nats', 'auth_nats', 'coherence'), True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PROBE = "axis_probe.jsonl"
OPTION_PAIRS = (("pos_option", "neg_option"), ("care_option", "authority_option"))  # (pos, neg) field names


class ProbeError(ValueError):
    """A probe file that does not have the probe schema (the message names the file and line)."""


@dataclass(frozen=True)
class Axis:
    """The axis of a run as the eval and the report read it (see the module docstring)."""

    name: str = "care-vs-authority"
    pos: str = "care"
    neg: str = "authority"
    probe: str = ""
    map_x: str = "Authority"
    map_y: str = "Care"

    @property
    def x_key(self) -> str:
        """The map's x metric (``auth_nats`` for Authority)."""
        return nats_key(self.map_x)

    @property
    def y_key(self) -> str:
        return nats_key(self.map_y)

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics read against the control band, deltas to base included."""
        return ("axis_logodds", self.y_key, self.x_key, "coherence")

    @property
    def is_default(self) -> bool:
        return self == DEFAULT

    @property
    def probe_title(self) -> str:
        """``axis probe log-odds care vs authority``: the probe metric's label."""
        return f"axis probe log-odds {self.pos} vs {self.neg}"

    def record(self) -> dict:
        """What eval.json stores under ``axis``."""
        return {**asdict(self), "headline": list(self.headline)}


DEFAULT = Axis()


def nats_key(foundation: str) -> str:
    """The metric of a foundation: ``"Authority"`` -> ``auth_nats`` (``evaluate.prompts.NATS_KEYS``)."""
    from .evaluate.prompts import NATS_KEYS

    if foundation not in NATS_KEYS:
        raise ProbeError(f"axis_map: {foundation!r} is not a foundation; choose from {', '.join(NATS_KEYS)}")
    return NATS_KEYS[foundation]


def from_config(cfg) -> Axis:
    """The :class:`Axis` a config names (its ``axis_*`` knobs)."""
    return Axis(name=cfg.axis_name, pos=cfg.axis_labels[0], neg=cfg.axis_labels[1], probe=cfg.axis_probe,
                map_x=cfg.axis_map[0], map_y=cfg.axis_map[1])


def from_eval(ev: dict) -> Axis:
    """The axis a round's eval.json was measured on (:data:`DEFAULT` when it records none)."""
    rec = ev.get("axis") or {}
    return Axis(**{k: rec[k] for k in Axis.__dataclass_fields__ if k in rec}) if rec else DEFAULT


def probe_path(value: str) -> Path:
    """The file a config value names (``axis_probe``, ``axis_prompts``): empty = the shipped probe;
    a bare name that is not a local file = a shipped data file of that name; anything else a path."""
    from . import datafiles

    if not value:
        return datafiles.path(DEFAULT_PROBE)
    p = Path(value)
    if not p.exists() and len(p.parts) == 1:
        return datafiles.path(value)
    return p


def _objects(text: str, source: str):
    """``(line number, "<source> line N", object)`` per non-blank JSONL line; ProbeError naming the line
    when it is not a JSON object."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{where} is not JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(r, dict):
            raise ProbeError(f"{where}: expected a JSON object, got {type(r).__name__}")
        yield n, where, r


def parse_probe(text: str, source: str = "probe") -> list[dict]:
    """Probe rows from JSONL text, validated; rows come back as ``id, situation, care_option
    (the pos side), authority_option (the neg side)``.

    Raises:
        ProbeError: ``<source> line N: <what is wrong>`` on the first bad line (bad JSON, not an
            object, a missing or empty field, both or neither option pair, equal options, a
            repeated id), or when the file has no items.

    Example:
        >>> parse_probe('{"id": "a", "situation": "s", "pos_option": "x", "neg_option": "y"}')[0]["care_option"]
        'x'
    """
    rows, seen = [], {}
    for n, where, r in _objects(text, source):
        pairs = [p for p in OPTION_PAIRS if any(k in r for k in p)]
        if len(pairs) != 1:
            raise ProbeError(f"{where}: give exactly one option pair, pos_option + neg_option (or the shipped "
                             f"care_option + authority_option); found {sorted(k for p in OPTION_PAIRS for k in p if k in r) or 'none'}")
        need = ("id", "situation", *pairs[0])
        missing = [k for k in need if not isinstance(r.get(k), str) or not r[k].strip()]
        if missing:
            raise ProbeError(f"{where}: missing or empty text fields {missing}; the schema is id, situation, "
                             f"{pairs[0][0]}, {pairs[0][1]}")
        pos, neg = (r[k].strip() for k in pairs[0])
        if pos == neg:
            raise ProbeError(f"{where}: the two options are the same text")
        if r["id"] in seen:
            raise ProbeError(f"{where}: id {r['id']!r} repeats line {seen[r['id']]}")
        seen[r["id"]] = n
        rows.append({"id": r["id"], "situation": r["situation"], "care_option": pos, "authority_option": neg})
    if not rows:
        raise ProbeError(f"{source} has no probe items")
    return rows


def load_probe(value: str = "", max_items: int = 0) -> list[dict]:
    """The probe items a config's ``axis_probe`` names (the first ``max_items``; 0 = all), validated."""
    p = probe_path(value)
    if not p.is_file():
        raise ProbeError(f"axis_probe: no such file {p} (a JSONL path, or the name of a file in steerheal_utils/data/)")
    rows = parse_probe(p.read_text(encoding="utf-8"), str(p))
    return rows[:max_items] if max_items else rows


def parse_prompts(text: str, source: str = "prompts") -> list[dict]:
    """Generation prompts from JSONL text, validated: rows of ``id``, ``text`` and ``domain`` (optional,
    default ``""``), the schema of the shipped ``dilemmas.jsonl``.

    Raises:
        ProbeError: ``<source> line N: <what is wrong>`` on the first bad line (bad JSON, not an
            object, a missing or empty ``id``/``text``, a ``domain`` that is not text, a repeated
            id), or when the file has no prompts.

    Example:
        >>> parse_prompts('{"id": "a", "text": "Your friend is sad. What do you say?"}')
        [{'id': 'a', 'text': 'Your friend is sad. What do you say?', 'domain': ''}]
    """
    rows, seen = [], {}
    for n, where, r in _objects(text, source):
        missing = [k for k in ("id", "text") if not isinstance(r.get(k), str) or not r[k].strip()]
        if missing:
            raise ProbeError(f"{where}: missing or empty text fields {missing}; the schema is id, text, domain (optional)")
        if not isinstance(r.get("domain", ""), str):
            raise ProbeError(f"{where}: domain must be text, got {type(r['domain']).__name__}")
        if r["id"] in seen:
            raise ProbeError(f"{where}: id {r['id']!r} repeats line {seen[r['id']]}")
        seen[r["id"]] = n
        rows.append({"id": r["id"], "text": r["text"], "domain": r.get("domain", "")})
    if not rows:
        raise ProbeError(f"{source} has no prompts")
    return rows


def load_prompts(value: str = "") -> list[dict]:
    """02's generation pool a config's ``axis_prompts`` names: empty = the shipped care-vs-authority
    dilemmas exactly as :func:`steerheal_utils.datafiles.prompts` reads them; otherwise validated."""
    from . import datafiles

    if not value:
        return datafiles.prompts("dilemmas")
    p = probe_path(value)
    if not p.is_file():
        raise ProbeError(f"axis_prompts: no such file {p} (a JSONL path, or the name of a file in steerheal_utils/data/)")
    return parse_prompts(p.read_text(encoding="utf-8"), str(p))


def check(cfg) -> None:
    """Everything about the axis knobs that can be checked before a model loads: the two labels,
    the map's foundations, the probe file (one-line :class:`ProbeError`, with the line number)."""
    if len(cfg.axis_labels) != 2 or not all(s.strip() for s in cfg.axis_labels):
        raise ProbeError(f"axis_labels: give two non-empty labels [pos side, neg side], got {cfg.axis_labels!r}")
    if len(cfg.axis_map) != 2 or cfg.axis_map[0] == cfg.axis_map[1]:
        raise ProbeError(f"axis_map: give two different foundations [x, y], got {cfg.axis_map!r}")
    for f in cfg.axis_map:
        nats_key(f)
    load_probe(cfg.axis_probe)
    load_prompts(cfg.axis_prompts)


# The default axis's figure labels, as the report has always written them (a custom axis gets
# neutral ones: which way is "up" for a foundation depends on the axis).
_DEFAULT_LABELS = {"auth_nats": "auth_nats (down = less authority)", "care_nats": "care_nats (up = more care)"}


def metric_label(ax: Axis, key: str) -> str:
    """A figure label for one of the axis's metrics (``axis_logodds``, the map's ``*_nats``)."""
    if key == "axis_logodds":
        return ax.probe_title
    if ax.is_default and key in _DEFAULT_LABELS:
        return _DEFAULT_LABELS[key]
    side = "x" if key == ax.x_key else "y" if key == ax.y_key else None
    return f"{key} ({side} of the {ax.name} map)" if side else key


def map_title(ax: Axis) -> str:
    """The map panel's title."""
    if ax.is_default:
        return "care vs authority (goal: up and to the left)"
    return f"{ax.name} map: {ax.map_y} vs {ax.map_x}"


def map_axis_titles(ax: Axis) -> tuple[str, str]:
    """``(x title, y title)`` of the map: ``auth_nats = ln profile[Authority]``..."""
    return f"{ax.x_key} = ln profile[{ax.map_x}]", f"{ax.y_key} = ln profile[{ax.map_y}]"


STEER_COLUMNS = ("axis_name", "axis_pos", "axis_neg", "round", "condition", "interval", "dose", "tag_kl", "axis_logodds",
                 "axis_logodds_lo", "axis_logodds_hi", "delta_axis_logodds", "delta_axis_logodds_lo",
                 "delta_axis_logodds_hi", "axis_logodds_band_z", "axis_logodds_band_rank", "axis_care_rate", "axis_mass")


def steerability(run_dir) -> list[dict]:
    """The axis's steerability check of a run, one row per condition of each round with a control band
    (base, prompted, the band's summary row, steered): the probe's log-odds with its 95% interval
    (``interval``: bootstrap; on the band's row ``band_min_max``, the controls' spread),
    the paired change from base with its interval, and where the steered model falls in the band
    (``axis_care_rate`` is the pos side's win rate). Read from metrics rows (``report.metric_rows``).
    """
    from .report import metric_rows, run_axis

    ax = run_axis(run_dir)
    rows = metric_rows(run_dir)
    banded = {r["round"] for r in rows if r["condition"] == "random"}
    out = []
    for r in rows:
        if r["round"] in banded and r["condition"] in ("base", "prompted", "random", "steered"):
            out.append({**{c: r.get(c) for c in STEER_COLUMNS}, "axis_name": ax.name, "axis_pos": ax.pos, "axis_neg": ax.neg})
    return out
