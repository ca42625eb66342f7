"""The steering vector as a value: per-layer directions, the dose unit, provenance; its file format.

The vector of layer L is the mean decoder-block output at the assistant tag (the last prompt
token) with the positive persona as system prompt, minus the same with the negative persona,
over many neutral user messages: ``v_L = mean(h_pos) - mean(h_neg)`` (:mod:`.extract`).

Dose unit: the vector is added as ``dose * r_L * v_L / ||v_L||`` (:meth:`SteeringVector.added`),
where ``r_L`` is the median residual-stream norm of that layer measured during extraction. Dose
0.1 is thus a push of 10% of a typical hidden state's length along the axis, on any model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..runfolder import atomic_write_bytes


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
        tensors = {f"layer.{layer}": v.contiguous().float().cpu() for layer, v in self.directions.items()}
        # One metadata key holding sorted JSON: safetensors writes several keys in a per-process
        # random order, and a resumed run should reproduce the file byte for byte.
        doc = {"meta": self.meta, "resid_norms": {str(k): v for k, v in self.resid_norms.items()}, "layers": self.layers}
        atomic_write_bytes(path, save(tensors, metadata={"steerheal": json.dumps(doc, sort_keys=True)}))

    @classmethod
    def load(cls, path: Path | str) -> "SteeringVector":
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
