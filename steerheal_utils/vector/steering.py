"""Adding the vector to a model: the :class:`Steering` spec and the hook context managers.

Every hook is registered inside a context manager and removed on exit (try/finally), also when
the body raises. :func:`steer` serves generation (positions counted across KV-cached calls);
:func:`steering` serves forwards whose rows have their assistant tags in different columns (the
eval); :func:`steering_slots` keeps persistent buffers for a compiled forward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..devices import block_device
from ..models import get_layers
from .modes import GATE_KINDS, gate_factor
from .value import SteeringVector

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
    h2 = h + getattr(mod, SLOT_ATTR).to(h.device, h.dtype)  # a no-op unless the model is spread over devices
    return (h2, *out[1:]) if isinstance(out, tuple) else h2


def _fast_add(vector: "SteeringVector", layer: int, dose: float, device, dtype) -> torch.Tensor:
    # The same ops, in the same dtype, as the general hook computes for a constant dose, so
    # the two paths agree bit for bit.
    add = vector.added(layer, 1.0).to(device, dtype)
    return torch.full((), float(dose), device=device).to(dtype) * add


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
            dev = block_device(b)
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
    With ``gate`` set (the ``cosine_gate`` mode, :mod:`.modes`) that multiplier is further scaled,
    per row and position, by :func:`.modes.gate_factor` of the block's output.

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
    gate: float | None = None
    gate_kind: str = "threshold"

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be 'all' or 'generated', got {self.positions!r}")
        if not math.isfinite(self.dose):
            raise ValueError(f"dose must be finite, got {self.dose}")
        if self.halflife < 0:
            raise ValueError(f"halflife must be >= 0 (0 = constant dose), got {self.halflife}")
        if self.gate_kind not in GATE_KINDS:
            raise ValueError(f"gate_kind must be one of {GATE_KINDS}, got {self.gate_kind!r}")

    @property
    def is_noop(self) -> bool:
        """Nothing is added (no vector or dose 0): the model computes exactly what it does unsteered."""
        return self.vector is None or self.dose == 0

    @property
    def is_constant(self) -> bool:
        """The same dose at every position: the fast path (one buffer per layer, compile-friendly)."""
        return self.positions == "all" and self.halflife == 0 and self.gate is None

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
def _position_hooks(blocks: nn.ModuleList, spec: Steering, gen_pos_of, row_scale_of=None) -> Iterator[None]:
    """Hooks adding ``spec.scale(g) * v_L`` where ``g = gen_pos_of(layer, seq_len, device)``, times
    ``row_scale_of()`` per row when given and the cosine gate when set; removed on exit."""
    handles = []

    def make(layer: int):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            g = gen_pos_of(layer, h.shape[1], h.device)
            add = spec.vector.added(layer, 1.0).to(h.device, h.dtype)
            scale = spec.scale(g)
            rows = row_scale_of() if row_scale_of is not None else None
            if rows is not None:
                scale = (scale if scale.ndim == 2 else scale[None]) * rows.to(scale.device, scale.dtype)[:, None]
            if spec.gate is not None:
                scale = scale * gate_factor(h, spec.vector.directions[layer], spec.gate, spec.gate_kind)
            h2 = _add_scaled(h, add, scale)
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
          halflife: int = 0, prompt_len: int | None = None, gate: float | None = None,
          gate_kind: str = "threshold") -> Iterator[None]:
    """Add ``dose`` times the vector to the output of each of its layers, inside the block.

    Args:
        model: a causal LM (plain or peft-wrapped).
        vector: the steering vector; ``None`` or ``dose == 0`` leaves the model untouched.
        dose: in units of each layer's median residual norm (module docstring).
        positions: ``"all"`` adds at every position, prompt included; ``"generated"`` from the
            assistant tag on (the last prompt position, where the vector was read, and every
            generated token).
        halflife: generated tokens over which the dose halves (0 = constant); see :class:`Steering`.
        gate, gate_kind: the cosine gate (:mod:`.modes`); ``None`` = off.
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
    spec = Steering(vector, dose, positions, halflife, gate, gate_kind)
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
def steering(model: nn.Module, spec: Steering | None, *, per_row: bool = False) -> Iterator:
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

    ``per_row=True`` always takes the hook path and ``at(gen_pos, row_scale)`` also takes one
    multiplier per row (``[rows]``, default 1) applied on top of the spec: rows of one batch
    steered at different doses (backtracking, :mod:`steerheal_utils.generate.backtrack`).

    Example:
        >>> with steering(model, Steering(sv, 0.1, "generated", 32)) as at:   # doctest: +SKIP
        ...     at(torch.arange(ids.shape[1]) - tag)
        ...     logits = model(input_ids=ids).logits
    """
    if spec is None or spec.is_noop or (spec.is_constant and not per_row):
        with steer(model, spec.vector if spec else None, spec.dose if spec else 0.0):
            yield lambda gen_pos, row_scale=None: None
        return
    blocks = get_layers(model)
    _check_layers(blocks, spec.vector)
    state: dict = {"g": None, "used": set(), "rows": None}

    def at(gen_pos: torch.Tensor, row_scale: torch.Tensor | None = None) -> None:
        state["g"], state["used"], state["rows"] = torch.as_tensor(gen_pos), set(), row_scale

    def gen_pos_of(layer: int, seq: int, device) -> torch.Tensor:
        g = state["g"]
        if g is None or layer in state["used"] or g.shape[-1] != seq:
            raise PositionsNotSet("steering(): call at(gen_pos) with this forward's positions (relative to the "
                                  f"assistant tag) before each forward (layer {layer}, {seq} positions)")
        state["used"].add(layer)
        return g.to(device)

    with _position_hooks(blocks, spec, gen_pos_of, lambda: state["rows"]):
        yield at


@contextlib.contextmanager
def _steer_fast(blocks: nn.ModuleList, vector: SteeringVector, dose: float, dtype: torch.dtype) -> Iterator[None]:
    """Constant dose at every position: write a free persistent slot in place, else add a
    temporary hook with its own buffer (nested steering stays additive)."""
    handles, written = [], []

    def temp_hook(buf: torch.Tensor):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h2 = h + buf.to(h.device, h.dtype)
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
                buf = _fast_add(vector, layer, dose, block_device(b), dtype)
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
