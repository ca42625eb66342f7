"""Compare two run folders file by file: are the artifacts the same, apart from wall-clock fields?

    python scripts/compare_runs.py runs/before runs/after

Every file present in either folder is compared. Binary files (safetensors, png) and JSONL /
CSV rows must be byte-identical; JSON files and JSONL rows are compared after dropping keys
that measure time (``seconds``, ``tokens_per_s``, ``finished``, ...) and replacing each run
folder's own path by ``<run>``; CSV columns named ``seconds`` are dropped. Executed notebooks
are compared by their code and their text outputs without timing lines. Files only one folder
has are listed (a new artifact is expected to appear there). Exit status 1 when a file differs.

    python scripts/compare_runs.py --renamed runs/made_before runs/made_after

``--renamed`` first applies the renames of the refactor that called what 05 evaluates a
"condition" (a "stage" is a pipeline step) to the first folder: ``eval_stages/`` is read as
``eval_conditions/``, eval.json's ``stages`` as ``conditions``, the ``stage`` of eval_rows.jsonl
and of metrics.csv as ``condition``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

RENAMED_PATHS = {"eval_stages": "eval_conditions"}
RENAMED_KEYS = {"eval.json": {"stages": "conditions"}, "eval_rows.jsonl": {"stage": "condition"},
                "metrics.csv": {"stage": "condition"}}
TIME_KEYS = {"seconds", "tokens_per_s", "finished", "created", "time", "adopted", "seconds_own", "stage_spans"}


def _scrub(obj, roots):
    if isinstance(obj, dict):
        return {k: _scrub(v, roots) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_scrub(v, roots) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(r, "<run>")
    return obj


def _notebook(path: Path, roots) -> list:
    nb = json.loads(path.read_text())
    out = []
    for c in nb["cells"]:
        texts = []
        for o in c.get("outputs", []):
            t = o.get("text") or (o.get("data") or {}).get("text/plain") or ""
            t = "".join(t) if isinstance(t, list) else t
            texts.append(re.sub(r"\d+(\.\d+)?\s*(s|it/s|s/it)\b|'seconds': [^,}]+", "<t>", t))
        out.append((c["cell_type"], "".join(c["source"]), _scrub(texts, roots)))
    return out


def _rename(obj, keys: dict):
    return {keys.get(k, k): v for k, v in obj.items()} if keys and isinstance(obj, dict) else obj


def same(a: Path, b: Path, roots, keys: dict | None = None) -> bool:
    """Whether ``a`` and ``b`` hold the same artifact; ``keys`` renames top-level keys of ``a`` first."""
    keys = keys or {}
    if a.suffix == ".json":
        return _scrub(_rename(json.loads(a.read_text()), keys), roots) == _scrub(json.loads(b.read_text()), roots)
    if a.suffix == ".jsonl":
        ra = [_scrub(_rename(json.loads(line), keys), roots) for line in a.read_text().splitlines() if line.strip()]
        rb = [_scrub(json.loads(line), roots) for line in b.read_text().splitlines() if line.strip()]
        return ra == rb
    if a.suffix == ".csv":
        def rows(p, keys):
            return [{keys.get(k, k): v for k, v in r.items() if k != "seconds"}
                    for r in csv.DictReader(io.StringIO(p.read_text()))]
        return rows(a, keys) == rows(b, {})
    if a.suffix == ".ipynb":
        return _notebook(a, roots) == _notebook(b, roots)
    return a.read_bytes() == b.read_bytes()


def main(argv: list[str]) -> int:
    renamed = "--renamed" in argv
    argv = [x for x in argv if x != "--renamed"]
    a, b = Path(argv[0]), Path(argv[1])
    roots = [str(a.resolve()), str(b.resolve()), str(a), str(b)]

    def new_name(rel: Path) -> Path:  # the path the first folder's file has after the renames
        return Path(*(RENAMED_PATHS.get(part, part) for part in rel.parts)) if renamed else rel

    fa = {new_name(p.relative_to(a)): p for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    bad = 0
    for rel in sorted(fa.keys() & fb):
        ok = same(fa[rel], b / rel, roots, RENAMED_KEYS.get(rel.name) if renamed else None)
        bad += not ok
        print(f"{'same' if ok else 'DIFFERS'}  {rel}")
    for rel in sorted(fa.keys() - fb):
        print(f"only in {a}: {rel}")
    for rel in sorted(fb - fa.keys()):
        print(f"only in {b}: {rel}")
    print(f"{len(fa.keys() & fb)} files in both, {bad} differ; {len(fa.keys() - fb)} only in {a}, "
          f"{len(fb - fa.keys())} only in {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
