"""Stage 01: the steering vector, and adding it to a model.

The vector of layer L is the mean decoder-block output at the assistant tag (the last
prompt token) with the positive persona as system prompt, minus the same with the
negative persona, over many neutral user messages: v_L = mean(h_pos) - mean(h_neg).
The user message is the same for both, so v isolates the persona axis.

Dose unit. :func:`steer` adds ``dose * r_L * v_L / ||v_L||`` at layer L, where ``r_L`` is
the median residual-stream norm of that layer measured during extraction (over every
prompt position of the contexts). Dose 0.1 is thus a push of 10% of a typical hidden
state's length along the axis, on any model, at any layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .models import get_layers, left_pad, model_device, persona_system, prompt_ids


# ------------------------------------------------------------------ the value object
@dataclass
class SteeringVector:
    """Per-layer steering directions plus what is needed to dose and trace them.

    Attributes:
        directions: layer index -> raw mean-difference vector v_L (float32, CPU).
        resid_norms: layer index -> median residual norm r_L (the dose unit).
        meta: provenance (model, round, persona hash, number of contexts...).

    Example:
        >>> sv = SteeringVector.load("runs/x/round_00/vector.safetensors")  # doctest: +SKIP
        >>> with steer(model, sv, dose=0.1):                                 # doctest: +SKIP
        ...     out = model.generate(**batch)
    """

    directions: dict[int, torch.Tensor]
    resid_norms: dict[int, float]
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self.directions.items()}

    def added(self, layer: int, dose: float) -> torch.Tensor:
        """The vector added at ``layer`` for ``dose`` (see the module docstring for the unit)."""
        v = self.directions[layer]
        return v * (dose * self.resid_norms[layer] / v.norm().clamp_min(1e-12))

    def cosine(self, other: "SteeringVector") -> dict[int, float]:
        """Per-layer cosine similarity with another vector (shared layers only)."""
        return {layer: float(torch.nn.functional.cosine_similarity(self.directions[layer], other.directions[layer], dim=0))
                for layer in self.layers if layer in other.directions}

    def rotated(self, seed: int) -> "SteeringVector":
        """The generic-disruption control: one Haar-random rotation Q applied to every layer's vector.

        ``Q v_L`` keeps each layer's norm and every cross-layer inner product (the Gram matrix),
        so the control's per-layer pushes compound over the band exactly as the persona's do;
        only the direction in the d-dimensional space is random (its cosine with the persona
        is ~ N(0, 1/d) per layer). An independent random direction per layer would not do:
        the persona's layer vectors point the same way (cosines 0.37-0.83 between layers 13-16
        of SmolLM2), independent ones do not, so their effect is smaller by construction
        (next-token KL 0.19-0.20 against the persona's 0.92 at the same dose, issue 12).

        Computed without a d x d matrix: with ``A = [v_L ...]`` (d x k) = ``U R`` (reduced QR,
        ``U`` an orthonormal basis of the span), ``Q A = (Q U) R`` and ``Q U`` is a uniformly
        random k-frame. That frame is drawn as the sign-fixed QR factor of a d x k Gaussian
        matrix (Haar on the Stiefel manifold), so the result has the distribution of a
        full Haar rotation at O(d k^2) cost. Directions only: the dose unit ``resid_norms``
        is the persona's, and matching the effect (KL) is :mod:`steerheal_utils.controls`'s job.

        Args:
            seed: the control's seed; different seeds give independent rotations.

        Example:
            >>> sv = SteeringVector({0: torch.tensor([3.0, 0, 0, 0]), 1: torch.tensor([0, 4.0, 0, 0])}, {0: 1.0, 1: 1.0})
            >>> r = sv.rotated(seed=1)
            >>> round(float(r.directions[1].norm()), 5), round(float(r.directions[0] @ r.directions[1]), 5)
            (4.0, 0.0)
        """
        layers = self.layers
        a = torch.stack([self.directions[layer].double() for layer in layers], dim=1)  # d x k
        d, k = a.shape
        if k > d:
            raise ValueError(f"rotated: {k} layer vectors in {d} dimensions: the span would need more dimensions than exist")
        u, r = torch.linalg.qr(a)  # a = u r, u: d x k orthonormal (also when the vectors are collinear)
        g = torch.Generator().manual_seed(int(seed))
        w, rw = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
        w = w * torch.where(rw.diagonal() < 0, -1.0, 1.0)  # sign fix: without it QR's frame is not Haar
        new = w @ r
        dirs = {layer: new[:, j].to(self.directions[layer].dtype) for j, layer in enumerate(layers)}
        return SteeringVector(dirs, dict(self.resid_norms), {**self.meta, "control": "rotation", "control_seed": int(seed)})

    def gram(self) -> torch.Tensor:
        """``[k, k]`` inner products between the layer vectors (layer order), float64."""
        a = torch.stack([self.directions[layer].double() for layer in self.layers], dim=1)
        return a.T @ a

    def save(self, path: Path | str) -> None:
        from safetensors.torch import save

        from .runfolder import atomic_write_bytes

        tensors = {f"layer.{layer}": v.contiguous().float().cpu() for layer, v in self.directions.items()}
        # One metadata key holding sorted JSON: safetensors writes several keys in a per-process
        # random order, and a resumed run should reproduce the file byte for byte.
        doc = {"meta": self.meta, "resid_norms": {str(k): v for k, v in self.resid_norms.items()}, "layers": self.layers}
        atomic_write_bytes(path, save(tensors, metadata={"steerheal": json.dumps(doc, sort_keys=True)}))

    @classmethod
    def load(cls, path: Path | str) -> "SteeringVector":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no steering vector at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta_raw = f.metadata() or {}
                dirs = {int(k.split(".", 1)[1]): f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors vector file: {e}") from None
        if "steerheal" in meta_raw:
            doc = json.loads(meta_raw["steerheal"])
        else:  # files written before the single-key layout
            doc = {"resid_norms": json.loads(meta_raw.pop("resid_norms", "{}")),
                   "meta": {k: json.loads(v) for k, v in meta_raw.items() if k != "layers"}}
        norms = {int(k): float(v) for k, v in doc["resid_norms"].items()}
        meta = doc["meta"]
        if set(norms) != set(dirs):
            raise ValueError(f"{path}: residual norms missing for layers {sorted(set(dirs) - set(norms))}")
        bad = sorted(layer for layer in dirs if not (torch.isfinite(dirs[layer]).all() and math.isfinite(norms[layer])))
        if bad:
            raise ValueError(f"{path}: layers {bad} have NaN or inf values (corrupted file): re-run the 01_vector stage that wrote it")
        return cls(dirs, norms, meta)


def persona_hash(pos: str, neg: str) -> str:
    return hashlib.sha256(f"{pos}\x00{neg}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------ contexts
def load_contexts(n: int | None = None, seed: int = 0) -> list[dict]:
    """The shipped neutral user messages; ``n`` of them, stratified over kinds by a seeded shuffle."""
    path = Path(str(resources.files("steerheal_utils").joinpath("data", "contexts.jsonl")))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n is None or n >= len(rows):
        return rows
    g = torch.Generator().manual_seed(seed)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    shuffled = {k: [v[i] for i in torch.randperm(len(v), generator=g).tolist()] for k, v in sorted(by_kind.items())}
    out = []
    while len(out) < n:  # round-robin over kinds so every kind is represented
        for k in shuffled:
            if shuffled[k] and len(out) < n:
                out.append(shuffled[k].pop())
    return out


# ------------------------------------------------------------------ reading hidden states
@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden states of the given decoder blocks; hooks removed on exit."""
    store: dict[int, torch.Tensor] = {}
    blocks = get_layers(model)
    handles = []

    def make(i):
        def hook(_mod, _inp, out):
            store[i] = out[0] if isinstance(out, tuple) else out
        return hook

    try:
        for i in layers:
            handles.append(blocks[i].register_forward_hook(make(i)))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def last_token_states(model: nn.Module, tok, prompts: Sequence[list[int]], layers: Sequence[int],
                      batch_size: int = 16, progress: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Hidden state at the last prompt token for each layer, and the median residual norm per layer.

    Returns ``(states, resid_norms)``: ``states[L]`` is ``[n_prompts, d]`` float32 on CPU;
    ``resid_norms[L]`` is the median L2 norm over every real (non-pad) prompt position. The median,
    not the mean: a few attention-sink positions carry norms several times the typical one
    (SmolLM2: a mean of ~650 against ~140 at the assistant tag), and the dose unit should be the
    typical hidden state.
    """
    from .progress import tqdm  # a plain final line, not a frozen widget, in the journal

    dev = model_device(model)
    states = {layer: [] for layer in layers}
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    order = list(range(len(prompts)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in tqdm(batches, desc="hidden states", disable=not progress, leave=False):
        ids, mask, pos = left_pad([prompts[i] for i in b], tok.pad_token_id, dev)
        with capture_layers(model, layers) as store:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        m = mask.bool()
        for layer in layers:
            h = store[layer].float()
            states[layer].append(h[:, -1].cpu())  # left padding: the assistant tag is last in every row
            norms[layer].append(h.norm(dim=-1)[m].cpu())
    out = {layer: torch.cat(v) for layer, v in states.items()}
    return out, {layer: float(torch.cat(norms[layer]).median()) for layer in layers}


def extract_vector(model: nn.Module, tok, user_messages: Sequence[str], pos_persona: str, neg_persona: str,
                   layers: Sequence[int], batch_size: int = 16, meta: dict | None = None,
                   progress: bool = False) -> tuple[SteeringVector, dict]:
    """Mean-difference steering vector at the assistant tag.

    Args:
        model, tok: the (possibly adapter-baked) model and its tokenizer.
        user_messages: neutral user turns, the same for both personas.
        pos_persona, neg_persona: persona descriptions ("someone who ...").
        layers: decoder block indices to read.

    Returns:
        ``(vector, details)`` where details holds per-context projections of pos and neg
        states onto the unit vector (``proj_pos``/``proj_neg``: layer -> list) for plots.
    """
    pos_sys, neg_sys = persona_system(pos_persona), persona_system(neg_persona)
    pos_ids = [prompt_ids(tok, u, pos_sys)[0] for u in user_messages]
    neg_ids = [prompt_ids(tok, u, neg_sys)[0] for u in user_messages]
    states, norms = last_token_states(model, tok, pos_ids + neg_ids, layers, batch_size, progress)
    n = len(user_messages)
    directions, proj_pos, proj_neg = {}, {}, {}
    for layer in layers:
        hp, hn = states[layer][:n], states[layer][n:]
        v = hp.mean(0) - hn.mean(0)
        directions[layer] = v
        unit = v / v.norm().clamp_min(1e-12)
        proj_pos[layer] = (hp @ unit).tolist()
        proj_neg[layer] = (hn @ unit).tolist()
    meta = {"n_contexts": n, "persona_hash": persona_hash(pos_persona, neg_persona),
            "pos_persona": pos_persona, "neg_persona": neg_persona, **(meta or {})}
    sv = SteeringVector(directions, norms, meta)
    if not all(torch.isfinite(v).all() for v in directions.values()):
        raise FloatingPointError("steering vector has NaN or inf entries: the model's hidden states are not finite")
    return sv, {"proj_pos": proj_pos, "proj_neg": proj_neg}


# ------------------------------------------------------------------ steering
SLOT_ATTR = "_steerheal_add"  # the per-block add buffer of steering_slots()
SLOT_BUSY = "_steerheal_add_busy"  # a steer() is writing that buffer now


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _add_hook(mod: nn.Module, _inp, out):
    """Forward hook of the fast path: add the block's preallocated buffer at every position.

    A plain module-level function reading a tensor attribute, with no Python-side state, so
    a compiled forward traces it once and later doses (written into the buffer in place)
    need no recompile.
    """
    h = out[0] if isinstance(out, tuple) else out
    h2 = h + getattr(mod, SLOT_ATTR).to(h.dtype)
    return (h2, *out[1:]) if isinstance(out, tuple) else h2


def _fast_add(vector: "SteeringVector", layer: int, dose: float, device, dtype) -> torch.Tensor:
    # The same ops, in the same dtype, as the general hook computes for a constant dose, so
    # the two paths agree bit for bit.
    add = vector.added(layer, 1.0).to(device, dtype)
    return torch.full((), float(dose), device=device).to(dtype) * add


def slot_layers(model: nn.Module) -> list[int]:
    """Layers that carry a persistent steering slot (see :func:`steering_slots`)."""
    return [i for i, b in enumerate(get_layers(model)) if hasattr(b, SLOT_ATTR)]


@contextlib.contextmanager
def steering_slots(model: nn.Module, layers: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Persistent zero add-buffers and hooks on ``layers`` (default: every block) for the whole block.

    Inside it, :func:`steer` with ``positions="all"`` and ``halflife=0`` writes
    ``dose * r_L * v_L / ||v_L||`` into the buffers in place (``copy_``) and zeroes them on
    exit, instead of registering hooks. The set of hooks a compiled forward saw therefore
    never changes, so a static-cache compiled ``generate`` does not recompile across doses,
    vectors or batches (torch.compile guards on a module's hook dict, and does not guard an
    empty one at all: a hook added after compiling on a hook-free model would be silently
    ignored; the slots exist before the first compiled call, so that cannot happen here).
    A zero buffer adds exactly 0, so outside :func:`steer` the model computes what it
    computes without slots. Nested use re-uses existing slots. Hooks and buffers are removed
    on exit, also when the body raises.
    """
    blocks = get_layers(model)
    layers = list(range(len(blocks))) if layers is None else sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"steering_slots: layers {bad} out of range for a model with {len(blocks)} layers")
    d = model.get_input_embeddings().weight.shape[1]
    dtype = _hidden_dtype(model)
    handles, mine = [], []
    try:
        for i in layers:
            b = blocks[i]
            if hasattr(b, SLOT_ATTR):
                continue
            dev = next(b.parameters()).device
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: updatable in and out of inference mode
                setattr(b, SLOT_ATTR, torch.zeros(d, device=dev, dtype=dtype))
            mine.append(i)
            handles.append(b.register_forward_hook(_add_hook))
        yield layers
    finally:
        for h in handles:
            h.remove()
        for i in mine:
            for attr in (SLOT_ATTR, SLOT_BUSY):
                if hasattr(blocks[i], attr):
                    delattr(blocks[i], attr)


POSITIONS = ("all", "generated")


@dataclass(frozen=True)
class Steering:
    """How a vector is applied: which vector, how much, where, and how the dose decays.

    Positions are counted from the assistant tag (the last prompt token, where the vector was
    read): ``g = sequence index - tag index``, so ``g < 0`` is the prompt before the tag,
    ``g = 0`` the tag and ``g > 0`` everything after it (generated tokens; in the eval the
    prefill, the think tokens and the forced answer suffix). The vector is added at ``g``
    with the multiplier::

        dose * [g >= 0 if positions == "generated" else 1] * 0.5 ** (max(g, 0) / halflife)

    (no decay when ``halflife == 0``), in units of each layer's median residual norm. This is
    what generation (02) applies, and what the eval (05) applies to every forward it runs.

    Example:
        >>> spec = Steering(None, 0.0)
        >>> spec.is_noop, spec.is_constant
        (True, True)
        >>> Steering(None, 0.2, positions="generated", halflife=2).scale(torch.tensor([-1, 0, 2, 4])).tolist()
        [0.0, 0.20000000298023224, 0.10000000149011612, 0.05000000074505806]
    """

    vector: SteeringVector | None
    dose: float = 0.0
    positions: str = "all"
    halflife: int = 0

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be 'all' or 'generated', got {self.positions!r}")
        if not math.isfinite(self.dose):
            raise ValueError(f"dose must be finite, got {self.dose}")
        if self.halflife < 0:
            raise ValueError(f"halflife must be >= 0 (0 = constant dose), got {self.halflife}")

    @property
    def is_noop(self) -> bool:
        """Nothing is added (no vector or dose 0): the model computes exactly what it does unsteered."""
        return self.vector is None or self.dose == 0

    @property
    def is_constant(self) -> bool:
        """The same dose at every position: the fast path (one buffer per layer, compile-friendly)."""
        return self.positions == "all" and self.halflife == 0

    def scale(self, gen_pos: torch.Tensor) -> torch.Tensor:
        """float32 multipliers of the unit-dose vector at positions ``gen_pos`` (relative to the tag)."""
        s = torch.full(gen_pos.shape, float(self.dose), device=gen_pos.device)
        if self.positions == "generated":
            s = s * (gen_pos >= 0)
        if self.halflife > 0:
            s = s * torch.pow(0.5, gen_pos.clamp(min=0).to(torch.float32) / self.halflife)
        return s


def _add_scaled(h: torch.Tensor, add: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``h + scale * add`` for hidden states ``[rows, seq, d]`` and multipliers ``[seq]`` or ``[rows, seq]``."""
    scale = scale.to(h.dtype)
    return h + (scale[None, :, None] if scale.ndim == 1 else scale[:, :, None]) * add


def _check_layers(blocks: nn.ModuleList, vector: SteeringVector) -> None:
    for layer in vector.layers:
        if layer >= len(blocks):
            raise ValueError(f"vector has layer {layer} but the model has {len(blocks)} layers: wrong model?")


@contextlib.contextmanager
def _position_hooks(blocks: nn.ModuleList, spec: Steering, gen_pos_of) -> Iterator[None]:
    """Hooks adding ``spec.scale(g) * v_L`` where ``g = gen_pos_of(layer, seq_len, device)``; removed on exit."""
    handles = []

    def make(layer: int):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            g = gen_pos_of(layer, h.shape[1], h.device)
            add = spec.vector.added(layer, 1.0).to(h.device, h.dtype)
            h2 = _add_scaled(h, add, spec.scale(g))
            return (h2, *out[1:]) if isinstance(out, tuple) else h2
        return hook

    try:
        for layer in spec.vector.layers:
            handles.append(blocks[layer].register_forward_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def steer(model: nn.Module, vector: SteeringVector | None, dose: float, *, positions: str = "all",
          halflife: int = 0, prompt_len: int | None = None) -> Iterator[None]:
    """Add ``dose`` times the vector to the output of each of its layers, inside the block.

    Args:
        model: a causal LM (plain or peft-wrapped).
        vector: the steering vector; ``None`` or ``dose == 0`` leaves the model untouched.
        dose: in units of each layer's median residual norm (module docstring).
        positions: ``"all"`` adds at every position, prompt included; ``"generated"`` from the
            assistant tag on (the last prompt position, where the vector was read, and every
            generated token).
        halflife: generated tokens over which the dose halves (0 = constant); see :class:`Steering`.
        prompt_len: length of the (padded) prompt. Defaults to the length of the first forward
            call, which is the prompt when used around ``generate`` with a KV cache. Positions
            are counted across calls (one KV-cached decoding run), so the tag is column
            ``prompt_len - 1`` of every row (left padding). For forwards whose rows have their
            tag elsewhere use :func:`steering`.

    ``positions="all"`` with ``halflife=0`` (the default) takes a fast path: a preallocated
    buffer per layer added at every position, with no per-call Python state, so it also works
    unchanged under a compiled forward. Inside :func:`steering_slots` it registers no hooks at
    all and only writes the buffers. The other settings count positions in Python (eager only).
    The hooks are removed on exit, also when the body raises.
    """
    spec = Steering(vector, dose, positions, halflife)
    if spec.is_noop:
        yield
        return
    blocks = get_layers(model)
    _check_layers(blocks, vector)
    if spec.is_constant:
        with _steer_fast(blocks, vector, dose, _hidden_dtype(model)):
            yield
        return
    seen = {layer: 0 for layer in vector.layers}  # positions seen so far, per layer (KV-cached decoding)
    plen = {"n": prompt_len}

    def gen_pos_of(layer: int, seq: int, device) -> torch.Tensor:
        start = seen[layer]
        seen[layer] += seq
        if plen["n"] is None:
            plen["n"] = seq
        return torch.arange(start, start + seq, device=device) - (plen["n"] - 1)  # 0 at the assistant tag

    with _position_hooks(blocks, spec, gen_pos_of):
        yield


class PositionsNotSet(RuntimeError):
    """A forward ran inside :func:`steering` without its positions (``at(gen_pos)``) being given first."""


@contextlib.contextmanager
def steering(model: nn.Module, spec: Steering | None) -> Iterator:
    """Apply ``spec`` to every forward inside the block, with positions given per forward.

    Yields ``at``: call ``at(gen_pos)`` before each forward, with the position of each of that
    forward's tokens relative to its row's assistant tag (``[rows, seq]``, or ``[seq]`` for all
    rows; see :class:`Steering`). Rows may have their tags in different columns (right-padded
    rests after a shared prefix) and a forward may start after the tag (KV-cached decoding).

    A constant spec (``positions="all"``, ``halflife=0``) takes :func:`steer`'s fast path
    (persistent slots where present, bit-identical to ``steer(model, vector, dose)``) and ``at``
    does nothing; a no-op spec (``None``, no vector or dose 0) adds nothing at all. Otherwise a
    forward whose positions were not given (or were given for another length) raises
    :class:`PositionsNotSet` instead of steering the wrong tokens. Hooks are removed on exit,
    also when the body raises.

    Example:
        >>> with steering(model, Steering(sv, 0.1, "generated", 32)) as at:   # doctest: +SKIP
        ...     at(torch.arange(ids.shape[1]) - tag)
        ...     logits = model(input_ids=ids).logits
    """
    if spec is None or spec.is_noop or spec.is_constant:
        with steer(model, spec.vector if spec else None, spec.dose if spec else 0.0):
            yield lambda gen_pos: None
        return
    blocks = get_layers(model)
    _check_layers(blocks, spec.vector)
    state: dict = {"g": None, "used": set()}

    def at(gen_pos: torch.Tensor) -> None:
        state["g"], state["used"] = torch.as_tensor(gen_pos), set()

    def gen_pos_of(layer: int, seq: int, device) -> torch.Tensor:
        g = state["g"]
        if g is None or layer in state["used"] or g.shape[-1] != seq:
            raise PositionsNotSet("steering(): call at(gen_pos) with this forward's positions (relative to the "
                                  f"assistant tag) before each forward (layer {layer}, {seq} positions)")
        state["used"].add(layer)
        return g.to(device)

    with _position_hooks(blocks, spec, gen_pos_of):
        yield at


@contextlib.contextmanager
def _steer_fast(blocks: nn.ModuleList, vector: SteeringVector, dose: float, dtype: torch.dtype) -> Iterator[None]:
    """Constant dose at every position: write a free persistent slot in place, else add a
    temporary hook with its own buffer (nested steering stays additive)."""
    handles, written = [], []

    def temp_hook(buf: torch.Tensor):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h2 = h + buf.to(h.dtype)
            return (h2, *out[1:]) if isinstance(out, tuple) else h2
        return hook

    try:
        for layer in vector.layers:
            b = blocks[layer]
            slot = getattr(b, SLOT_ATTR, None)
            if slot is not None and not getattr(b, SLOT_BUSY, False):
                with torch.no_grad():
                    slot.copy_(_fast_add(vector, layer, dose, slot.device, slot.dtype))
                setattr(b, SLOT_BUSY, True)
                written.append(b)
            else:
                buf = _fast_add(vector, layer, dose, next(b.parameters()).device, dtype)
                handles.append(b.register_forward_hook(temp_hook(buf)))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b in written:
                getattr(b, SLOT_ATTR).zero_()
                setattr(b, SLOT_BUSY, False)


def check_vector_matches(vector: SteeringVector, model: nn.Module) -> None:
    """Raise a clear error when a vector was made for another model (layers or width differ)."""
    blocks = get_layers(model)
    d = model.get_input_embeddings().weight.shape[1]
    for layer, v in vector.directions.items():
        if layer >= len(blocks):
            raise ValueError(f"vector layer {layer} does not exist in this model ({len(blocks)} layers)")
        if v.shape[-1] != d:
            raise ValueError(f"vector width {v.shape[-1]} does not match the model's hidden size {d}")


# ------------------------------------------------------------------ the stage
def run_stage(ctx, model: nn.Module, tok) -> tuple[SteeringVector, dict]:
    """01_vector: extract this round's vector from the current student and save it.

    Writes ``round_NN/vector.safetensors`` (one tensor per steered layer; metadata: model,
    layers, persona pair hash, round, number of contexts, residual norms).
    """
    from .models import n_layers

    cfg = ctx.cfg
    layers = cfg.steered_layers(n_layers(model))
    contexts = load_contexts(cfg.n_contexts, seed=cfg.seed)
    sv, details = extract_vector(model, tok, [c["text"] for c in contexts], cfg.pos_persona, cfg.neg_persona,
                                 layers, batch_size=cfg.batch_size, progress=True,
                                 meta={"model": cfg.model, "round": ctx.round, "layers": layers})
    sv.save(ctx.artifact("vector"))
    details["contexts"] = [c["id"] for c in contexts]
    if ctx.round > 0:
        first = SteeringVector.load(ctx.artifact("vector", 0))
        details["cosine_to_round0"] = sv.cosine(first)
    return sv, details


def separation(details: dict) -> dict[int, float]:
    """Per layer: gap between mean pos and neg projections, in pooled standard deviations."""
    out = {}
    for layer, pp in details["proj_pos"].items():
        p, n = torch.tensor(pp), torch.tensor(details["proj_neg"][layer])
        sd = torch.cat([p - p.mean(), n - n.mean()]).std().clamp_min(1e-12)
        out[layer] = float((p.mean() - n.mean()) / sd)
    return out


def figures(sv: SteeringVector, details: dict):
    """Plotly figures for the notebook: per-layer norms, pos/neg separation, drift from round 0."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = sv.layers
    fig = make_subplots(rows=1, cols=2, subplot_titles=("‖v_L‖ and median residual norm r_L", "projections onto v_L (pos vs neg)"))
    fig.add_bar(x=layers, y=[sv.norms()[i] for i in layers], name="‖v_L‖", row=1, col=1)
    fig.add_scatter(x=layers, y=[sv.resid_norms[i] for i in layers], name="r_L", mode="lines+markers", row=1, col=1)
    for layer in layers:
        fig.add_trace(go.Box(y=details["proj_pos"][layer], name=f"L{layer} pos", marker_color="seagreen", showlegend=False), row=1, col=2)
        fig.add_trace(go.Box(y=details["proj_neg"][layer], name=f"L{layer} neg", marker_color="firebrick", showlegend=False), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(height=380, title=f"round {sv.meta.get('round', '?')}: steering vector")
    figs = [fig]
    if "cosine_to_round0" in details:
        cos = details["cosine_to_round0"]
        figs.append(go.Figure(go.Bar(x=list(cos), y=list(cos.values())),
                              layout=dict(title="cosine to round 0's vector, per layer", yaxis=dict(range=[-1, 1]), height=300)))
    return figs
