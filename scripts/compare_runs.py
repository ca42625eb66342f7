"""Compare two run folders file by file: are the artifacts the same, apart from wall-clock fields?

    python scripts/compare_runs.py runs/before runs/after

Every file present in either folder is compared. Binary files (safetensors, png) and JSONL /
CSV rows must be byte-identical; JSON files and JSONL rows are compared after dropping keys
that measure time (``seconds``, ``tokens_per_s``, ``finished``, ...) and replacing each run
folder's own path by ``<run>``; CSV columns named ``seconds`` are dropped. Executed notebooks
are compared by their code and their text outputs without timing lines. Files only one folder
has are listed (a new artifact is expected to appear there). Exit status 1 when a file differs.

    python scripts/compare_runs.py --renamed runs/made_before runs/made_after

``--renamed`` compares a copy of the first folder brought to this version's names by
``steerheal upgrade`` (:mod:`steerheal_utils.upgrade`, the one place that knows the renames of
the refactor that called what 05 evaluates a "condition"); the first folder is not touched.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

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


def same(a: Path, b: Path, roots) -> bool:
    """Whether ``a`` and ``b`` hold the same artifact."""
    if a.suffix == ".json":
        return _scrub(json.loads(a.read_text()), roots) == _scrub(json.loads(b.read_text()), roots)
    if a.suffix == ".jsonl":
        def lines(p):
            return [_scrub(json.loads(line), roots) for line in p.read_text().splitlines() if line.strip()]
        return lines(a) == lines(b)
    if a.suffix == ".csv":
        def rows(p):
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(io.StringIO(p.read_text()))]
        return rows(a) == rows(b)
    if a.suffix == ".ipynb":
        return _notebook(a, roots) == _notebook(b, roots)
    return a.read_bytes() == b.read_bytes()


def main(argv: list[str]) -> int:
    renamed = "--renamed" in argv
    argv = [x for x in argv if x != "--renamed"]
    a, b = Path(argv[0]), Path(argv[1])
    if renamed:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / a.name
            shutil.copytree(a, copy, ignore=shutil.ignore_patterns(".lock"))
            from steerheal_utils.upgrade import upgrade_run

            upgrade_run(copy)
            return compare(copy, b, shown=a)
    return compare(a, b)


def compare(a: Path, b: Path, shown: Path | None = None) -> int:
    """Print one line per file and a summary; 1 when a file differs. ``shown``: the name printed for ``a``."""
    shown = shown or a
    roots = [str(a.resolve()), str(b.resolve()), str(a), str(b), str(shown.resolve()), str(shown)]
    fa = {p.relative_to(a): p for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    bad = 0
    for rel in sorted(fa.keys() & fb):
        ok = same(fa[rel], b / rel, roots)
        bad += not ok
        print(f"{'same' if ok else 'DIFFERS'}  {rel}")
    for rel in sorted(fa.keys() - fb):
        print(f"only in {shown}: {rel}")
    for rel in sorted(fb - fa.keys()):
        print(f"only in {b}: {rel}")
    print(f"{len(fa.keys() & fb)} files in both, {bad} differ; {len(fa.keys() - fb)} only in {shown}, "
          f"{len(fb - fa.keys())} only in {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
