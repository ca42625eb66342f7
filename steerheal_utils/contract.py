"""The round contract: what every pipeline step reads and writes, declared once.

Every file of a run folder is named here. Stages, notebooks, the report and the study ask
for an artifact by name (``contract.path(run_dir, rnd, "completions")``, or
``ctx.artifact("completions")`` inside a stage) instead of spelling out a file name; the
driver seals each step's marker from the same table (:mod:`steerheal_utils.markers`), and
ARCHITECTURE.md and the README's run-folder tree are generated from it
(``python -m steerheal_utils.contract`` prints them; ``tests/test_contract.py`` checks them).

Adding an artifact: add an :class:`Artifact` to :data:`ARTIFACTS`, name it in the ``writes``
of the step that produces it and in the ``reads`` of every step that uses it, and write it
in that step's code with ``ctx.artifact(name)``. Markers, checks, resume and docs follow.

Hidden edges made explicit (each is a ``Read`` or a config section below):

- 02 runs the 03 filter on every sample (dose search, kept counts): it uses the filter's keys;
- 03 writes its own scored file (``completions``) instead of rewriting 02's ``generated``;
- 04 samples and filters again for Q1: it uses sampling and filter keys;
- 05 takes its dose from 02's ``generate_summary``, and round 0's vector for the drift figure;
- 01 reads round 0's vector (drift), 03 round 0's ``filter_summary`` (labelled-set reuse);
- every step of round r that loads the student reads the adapters of rounds < r.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

STAGES = ("01_vector", "02_generate", "03_filter", "04_heal", "05_eval")
"""The pipeline steps of a round, in order (one notebook each)."""

ONLINE_STAGES = ("01_vector", "06_online", "05_eval")
"""The steps of a checkpoint of the online loop (``loop=online``): 06 samples, filters and heals per batch."""

LOOPS = {"rounds": STAGES, "online": ONLINE_STAGES}
"""The config's ``loop`` -> the steps of each of its rounds, in order."""

MAX_ROUND = 99  # round folders are round_00 .. round_99


class ContractError(ValueError):
    """A step asked for an artifact it does not declare, or a name that is not in the contract."""


@dataclass(frozen=True)
class Artifact:
    """One file (or folder) a step writes into a round folder."""

    name: str   # what code asks for
    file: str   # where it lives, relative to round_NN/
    what: str   # one line for the docs
    kind: str = "file"  # "file"; "dir" (hashed file by file); "cache" (a folder of re-usable results, never checked)


@dataclass(frozen=True)
class Read:
    """An input edge: ``name`` of this round, of round 0 ("first"), or of every earlier round."""

    name: str
    of: str = "this"  # "this" | "first" | "earlier"
    why: str = ""


@dataclass(frozen=True)
class Step:
    """A pipeline step: its notebook, what it reads, what it writes, which config it uses."""

    name: str
    does: str
    reads: tuple[Read, ...]
    writes: tuple[str, ...]
    config: tuple[str, ...]  # config sections (config.SECTIONS) or single keys
    files: tuple[str, ...] = ()  # config keys whose value names an input file (hashed like an artifact)


ARTIFACTS: dict[str, Artifact] = {a.name: a for a in (
    Artifact("vector", "vector.safetensors", "steering vector: one direction per steered layer, residual norms, metadata"),
    Artifact("generated", "generated.jsonl", "completions as sampled at the chosen dose, with 02's filter verdict"),
    Artifact("calibration", "calibration.jsonl", "every dose-search probe: dose, verdict, completion"),
    Artifact("generate_summary", "generate.json", "the dose (read by 05), the search path, counts per reason, timings"),
    Artifact("completions", "completions.jsonl", "02's completions with every filter score, the reason and keep (04 trains on keep)"),
    Artifact("filter_summary", "filter.json", "counts per reason, thresholds, precision/recall on the labelled set"),
    Artifact("adapter", "adapter", "this round's LoRA (peft folder, safetensors only)", kind="dir"),
    Artifact("heal_summary", "heal.json", "heal config, tau, lam_r and the training summary"),
    Artifact("heal_steps", "heal_steps.csv", "per-step training telemetry"),
    Artifact("heal_q1", "heal_q1.json", "Q1: the healed model's own answers vs the steered ones"),
    Artifact("eval", "eval.json", "every eval condition of the round: vignettes, axis probe, held-out answers, stop"),
    Artifact("eval_rows", "eval_rows.jsonl", "per-vignette results of every eval condition"),
    Artifact("online_steps", "online_steps.csv", "per-step telemetry of the online loop: sampled, kept, keep rate, loss, D, KL, generated tokens"),
    Artifact("online_state", "online_state.safetensors", "the online loop's resume state (adapter, optimizer, step, RNG, vector, rows so far), rewritten atomically every step, removed when the checkpoint is written",
             kind="cache"),
    Artifact("eval_cache", "eval_conditions", "one finished eval condition per file, with an input fingerprint (crash resume, study sharing)",
             kind="cache"),
)}

STEPS: dict[str, Step] = {s.name: s for s in (
    Step("01_vector", "mean hidden-state difference pos - neg persona at the assistant tag, read from the current student",
         reads=(Read("adapter", "earlier", "the student: earlier rounds' adapters baked in"),
                Read("vector", "first", "drift: cosine to round 0's vector (notebook figure)")),
         writes=("vector",), config=("common", "vector")),
    Step("02_generate", "steered completions at a dose calibrated so that the filter keeps calib_target",
         reads=(Read("adapter", "earlier", "the student samples"),
                Read("vector", "this", "the steering vector"),
                Read("generate_summary", "first", "calib_rounds=first: round 0's dose, reused")),
         writes=("generated", "calibration", "generate_summary"),
         config=("common", "generate", "filter"), files=("axis_prompts",)),  # the 03 filter judges every sample
    Step("03_filter", "scores every completion under the base model and decides keep or the drop reason",
         reads=(Read("generated", "this", "the rows to score"),
                Read("filter_summary", "first", "round 0's labelled-set result, reused when the thresholds match")),
         writes=("completions", "filter_summary"), config=("common", "filter")),
    Step("04_heal", "a fresh LoRA on the kept completions under the KL barrier; Q1 samples and filters its own answers",
         reads=(Read("adapter", "earlier", "the student; the KL reference"),
                Read("completions", "this", "the kept rows; Q1's prompts")),
         writes=("adapter", "heal_summary", "heal_steps", "heal_q1"),
         config=("common", "heal", "filter", "temperature", "top_p", "top_k", "max_new_tokens", "gen_batch_size")),
    Step("05_eval", "vignettes (tiny-mfv protocol) and the axis probe for base, steered, healed and the controls",
         reads=(Read("adapter", "earlier", "the student"),
                Read("adapter", "this", "the healed model"),
                Read("vector", "this", "the steered model and the random control"),
                Read("generate_summary", "this", "the dose 02 calibrated"),
                Read("vector", "first", "vector_cosine_to_round0"),
                Read("eval", "first", "round 0's base: the reference of every delta and its paired CI"),
                Read("eval_rows", "first", "round 0's base, per vignette (paired bootstrap)")),
         writes=("eval", "eval_rows", "eval_cache"),
         config=("common", "eval", "dose", "steer_positions", "dose_halflife", "steer_mode", "cos_gate", "gate_kind",
                 "gen_batch_size"), files=("vignettes", "axis_probe")),
    Step("06_online", "loop=online: per training step, steered completions of the current student, filtered, one heal step on the kept ones",
         reads=(Read("adapter", "earlier", "the student; the KL reference"),
                Read("vector", "this", "the steering vector of the checkpoint's start (re-read every online_refresh steps)"),
                Read("online_steps", "earlier", "the telemetry figure spans every checkpoint so far")),
         writes=("adapter", "completions", "generate_summary", "heal_summary", "heal_steps", "online_steps", "online_state"),
         config=("common", "vector", "generate", "filter", "heal", "online"), files=("axis_prompts",)),
)}

# Files of the run folder itself (not of a round).
RUN_FILES: dict[str, tuple[str, str]] = {
    "config": ("config.yaml", "the config the next stage runs with + provenance (_meta)"),
    "config_history": ("config_history.jsonl", "every config the run used: what changed, when, from which round on"),
    "metrics": ("metrics.csv", "one row per (round, eval condition), from the rounds whose records hold"),
    "report": ("report.html", "the run report (self-contained)"),
    "trajectory": ("trajectory.png", "the report's panels as a static figure"),
    "stop": ("stop.json", "why the loop stopped early (coh_floor), if it did"),
    "lock": (".lock", "held by the one `steerheal run` working in the folder"),
    "shared_from": ("shared_from.json", "study runs only: round 0 files copied from another arm"),
    "steerability": ("steerability.json", "`steerheal steerability`: round 0's vector and its KL-matched random band over a dose sweep, CIs, the recommended dose"),
    "steerability_table": ("steerability.csv", "`steerheal steerability`: the dose-response table, one row per dose and vector"),
}

MARKER_DIR = ".done"
EXPLORE_DIR = "explore"


# ------------------------------------------------------------------ lookups
def round_dir(run_dir: Path | str, rnd: int) -> Path:
    """``run_dir/round_NN``: the only place a round folder's name is spelled."""
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= MAX_ROUND:
        from .runfolder import RunFolderError

        raise RunFolderError(f"round must be an integer in 0..{MAX_ROUND}, got {rnd!r}")
    return Path(run_dir) / f"round_{rnd:02d}"


def artifact(name: str) -> Artifact:
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise ContractError(f"unknown artifact {name!r}; the contract names {', '.join(ARTIFACTS)}") from None


def step(name: str) -> Step:
    if name not in STEPS:
        from .runfolder import RunFolderError

        raise RunFolderError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STEPS[name]


def path(run_dir: Path | str, rnd: int, name: str) -> Path:
    """The journal copy of artifact ``name`` of round ``rnd``.

    Example:
        >>> path("runs/x", 1, "completions")
        PosixPath('runs/x/round_01/completions.jsonl')
    """
    return round_dir(run_dir, rnd) / artifact(name).file


def read_eval(run_dir: Path | str, rnd: int) -> dict:
    """Round ``rnd``'s eval record (``eval``) as this version writes it: its conditions under
    ``"conditions"``. A record made by an older version (``"stages"``) is refused with
    RunFolderError naming the command that renames it (:mod:`steerheal_utils.upgrade`), not read half-way."""
    from .runfolder import RunFolderError, read_json

    p = path(run_dir, rnd, "eval")
    doc = read_json(p, "eval record")
    if not isinstance(doc, dict) or "conditions" not in doc:
        old = " (it has 'stages': what is now called 'conditions')" if isinstance(doc, dict) and "stages" in doc else ""
        fix = (f"`python -m steerheal_utils upgrade {run_dir}` renames it in place" if old else
               f"run 05_eval of round {rnd} again (delete {marker_path(run_dir, rnd, '05_eval')} and re-run the same command)")
        raise RunFolderError(f"{p} was made by an older version of steerheal{old}: {fix}")
    return doc


def run_path(run_dir: Path | str, name: str) -> Path:
    """A file of the run folder itself (:data:`RUN_FILES`), e.g. ``run_path(d, "metrics")``."""
    if name not in RUN_FILES:
        raise ContractError(f"unknown run file {name!r}; the contract names {', '.join(RUN_FILES)}")
    return Path(run_dir) / RUN_FILES[name][0]


def marker_path(run_dir: Path | str, rnd: int, stage: str) -> Path:
    return round_dir(run_dir, rnd) / MARKER_DIR / f"{step(stage).name}.json"


def journal_path(run_dir: Path | str, rnd: int, stage: str) -> Path:
    """The executed notebook of a step (the lab journal)."""
    return round_dir(run_dir, rnd) / f"{step(stage).name}.ipynb"


def loop_stages(loop: str = "rounds") -> tuple[str, ...]:
    """The steps of one round of ``loop`` (the config's ``loop``), in order."""
    if loop not in LOOPS:
        raise ContractError(f"unknown loop {loop!r}; loops are {', '.join(LOOPS)}")
    return LOOPS[loop]


def home_loop(stage: str) -> str:
    """The loop whose rounds run ``stage`` (the round loop for the steps both share)."""
    return next(loop for loop, stages in LOOPS.items() if stage in stages)


def producer(name: str, loop: str = "rounds") -> str:
    """The step that writes artifact ``name`` in a round of ``loop`` (04_heal writes ``adapter`` in
    the round loop, 06_online in the online one)."""
    for s in (*loop_stages(loop), *STEPS):
        if name in STEPS[s].writes:
            return s
    raise ContractError(f"no step writes {name!r}")


def inputs(stage: str, rnd: int) -> list[tuple[str, int]]:
    """``(artifact, round)`` pairs step ``stage`` of round ``rnd`` reads, in declaration order.

    ``first`` in round 0 is this round's copy; a read of the step's own output (round 0's
    vector for 01 in round 0) is not an input.
    """
    st = step(stage)
    out: list[tuple[str, int]] = []
    for rd in st.reads:
        rounds = {"this": [rnd], "first": [0], "earlier": list(range(rnd))}[rd.of]
        for r in rounds:
            if (r == rnd and rd.name in st.writes) or (rd.name, r) in out:
                continue
            out.append((rd.name, r))
    return out


def allowed(stage: str, rnd: int, name: str, of_round: int) -> str:
    """``"write"`` or ``"read"`` when step ``stage`` of round ``rnd`` may use ``name`` of round
    ``of_round``; raises ContractError naming the step and the artifact otherwise."""
    st = step(stage)
    artifact(name)
    if of_round == rnd and name in st.writes:
        return "write"
    if (name, of_round) in inputs(stage, rnd):
        return "read"
    raise ContractError(f"{stage} does not declare {name!r} of round {of_round} (round {rnd}): "
                        "add it to the step's reads in steerheal_utils/contract.py")


# ------------------------------------------------------------------ config sections
def sections() -> dict[str, tuple[str, ...]]:
    """Section name -> the Config keys in it, in order (each knob declares its section in config.py)."""
    from .config import SECTIONS, section_keys

    return {sec: section_keys(sec) for sec in SECTIONS}


def config_keys(stage: str) -> tuple[str, ...]:
    """The config keys step ``stage`` uses (its sections and single keys), in Config order."""
    from .config import Config

    secs = sections()
    want: set[str] = set()
    for entry in step(stage).config:
        want |= set(secs.get(entry, (entry,)))
    return tuple(f.name for f in dataclasses.fields(Config) if f.name in want)


# ------------------------------------------------------------------ docs
def _shown(a: Artifact) -> str:
    """An artifact's name in the docs: folders end in ``/`` (a cache is a folder unless its name has a suffix)."""
    folder = a.kind == "dir" or (a.kind == "cache" and "." not in a.file)
    return a.file + ("/" if folder else "")


def stage_graph_markdown() -> str:
    """The stage graph (mermaid) and one table row per step: reads, writes, config."""
    lines = ["```mermaid", "flowchart LR"]
    for st in STEPS.values():
        lines.append(f"  s{st.name[:2]}[{st.name}]")
    edges = []
    for st in STEPS.values():
        for rd in st.reads:
            src = producer(rd.name, home_loop(st.name))
            label = rd.name if rd.of == "this" else f"{rd.name} ({'round 0' if rd.of == 'first' else 'rounds < r'})"
            e = f"  s{src[:2]} -- {label} --> s{st.name[:2]}"
            if e not in edges:
                edges.append(e)
    lines += edges + ["```", "",
                      "| step | reads | writes (round_NN/) | config |", "|---|---|---|---|"]
    for st in STEPS.values():
        reads = "; ".join(f"`{r.name}`" + ("" if r.of == "this" else f" of {'round 0' if r.of == 'first' else 'every earlier round'}")
                          + (f" ({r.why})" if r.why else "") for r in st.reads)
        if st.files:
            reads += "; the files named by " + ", ".join(f"`{k}`" for k in st.files)
        writes = "; ".join(f"`{n}` = `{_shown(artifact(n))}`" for n in st.writes)
        lines.append(f"| `{st.name}` | {reads} | {writes} | {', '.join(st.config)} |")
    return "\n".join(lines) + "\n"


def run_folder_tree() -> str:
    """The run folder layout, one line per file, from the table."""
    rows = [(f"{f}", what) for f, what in RUN_FILES.values()]
    for st in STEPS.values():
        rows.append((f"round_NN/{st.name}.ipynb", f"{st.name}, executed (the lab journal)"))
    seen = set()
    for st in STEPS.values():
        for n in st.writes:
            if n in seen:  # written by a step of each loop (adapter: 04_heal or 06_online)
                continue
            seen.add(n)
            a = artifact(n)
            rows.append((f"round_NN/{_shown(a)}", f"{st.name}: {a.what}"))
    rows.append((f"round_NN/{MARKER_DIR}/<step>.json", "a step's record: hashes of what it read and wrote, the config it used"))
    rows.append((f"round_NN/{EXPLORE_DIR}/<hash>/", "what notebooks run by hand on a finished step wrote (scratch)"))
    width = max(len(f) for f, _ in rows) + 2
    return "\n".join(f"runs/<run>/{f.ljust(width)}{what}" for f, what in rows) + "\n"


DOC_BLOCKS = (  # (file, begin marker, end marker, generator): the docs generated from the table
    ("ARCHITECTURE.md", "<!-- begin contract", "<!-- end contract -->", stage_graph_markdown),
    ("ARCHITECTURE.md", "<!-- begin run folder", "<!-- end run folder -->", lambda: "```\n" + run_folder_tree() + "```\n"),
    ("README.md", "<!-- begin run folder", "<!-- end run folder -->", lambda: "```\n" + run_folder_tree() + "```\n"),
)


def write_docs(root: Path | str) -> list[Path]:
    """Regenerate every :data:`DOC_BLOCKS` block under ``root`` in place; return the files changed."""
    changed = []
    for name, begin, end, make in DOC_BLOCKS:
        p = Path(root) / name
        text = p.read_text()
        head, rest = text.split(begin, 1)
        marker_line, rest = rest.split("\n", 1)
        _, tail = rest.split(end, 1)
        new = head + begin + marker_line + "\n" + make() + end + tail
        if new != text:
            p.write_text(new)
            changed.append(p)
    return changed


def main() -> None:  # pragma: no cover - `python -m steerheal_utils.contract [--write]`
    import sys

    if "--write" in sys.argv[1:]:
        for p in write_docs(Path(__file__).resolve().parent.parent):
            print(f"rewrote {p}")
        return
    print(stage_graph_markdown())
    print(run_folder_tree())


if __name__ == "__main__":  # pragma: no cover
    main()
