"""The golden-fixtures format: manifest checks, lazily loaded tensor files, per-case results and the
tolerance comparison (``|actual - expected| <= atol + rtol * |expected|``; label maps exactly).

Used by :mod:`naclip.testing.replay_fixtures` (the command) and :mod:`naclip.testing.cases`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CaseResult", "Comparator", "FixturesError", "Tensors", "fp32_tolerance", "load_manifest"]

_DEFAULT_TOL = 1e-4
_LABEL_OUTPUTS = frozenset({"pred", "patch_logit_temp", "outlier_indices"})


class FixturesError(ValueError):
    """The fixtures directory is missing, or its manifest / tensor files are unreadable or malformed."""


@dataclass
class CaseResult:
    """Outcome of one fixture case.

    ``diffs`` maps each compared output name to its max abs difference; ``mismatched`` maps label outputs
    (``pred``) to their number of differing pixels. ``error`` is set (and ``passed`` is False) when the case
    raised; ``failures`` names the outputs outside the tolerance.
    """

    case_id: str
    kind: str
    passed: bool
    max_abs_diff: float = 0.0
    diffs: dict[str, float] = field(default_factory=dict)
    mismatched: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: str | None = None

    def line(self) -> str:
        """One human-readable report line."""
        status = "ok  " if self.passed else "FAIL"
        if self.error is not None:
            return f"{status} {self.case_id}  ERROR {self.error}"
        parts = [f"max abs diff {self.max_abs_diff:.3g}"]
        parts += [f"{name} mismatched pixels {n}" for name, n in self.mismatched.items()]
        if self.failures:
            parts.append("exceeds tolerance: " + ", ".join(self.failures))
        return f"{status} {self.case_id}  " + "; ".join(parts)


def load_manifest(fixtures_dir: str | os.PathLike) -> dict:
    """Read and sanity-check ``DIR/manifest.json``; raises :class:`FixturesError` with the reason."""
    d = Path(fixtures_dir)
    if not d.exists():
        raise FixturesError(f"fixtures directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise FixturesError(f"fixtures path {str(d)!r} is not a directory")
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise FixturesError(f"fixtures directory {str(d)!r} has no manifest.json")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FixturesError(f"cannot read {str(mpath)!r}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), list):
        raise FixturesError(
            f"{str(mpath)!r} is not a fixtures manifest (expected an object with a 'cases' list)"
        )
    for i, case in enumerate(manifest["cases"]):
        if not isinstance(case, dict) or not {"kind", "id", "file"} <= case.keys():
            raise FixturesError(f"{str(mpath)!r}: case #{i} lacks one of the fields 'kind', 'id', 'file'")
    return manifest


def fp32_tolerance(manifest: dict) -> tuple[float, float]:
    """(atol, rtol) of the manifest's fp32 recommendation (default 1e-4 / 1e-4)."""
    tol = manifest.get("tolerances", {})
    rec = {**tol.get("recommended", {}), **{k: v for k, v in tol.items() if k.lower().startswith("fp32")}}
    for key, val in rec.items():
        if key.lower().startswith("fp32") and isinstance(val, dict) and "atol" in val:
            return float(val["atol"]), float(val.get("rtol", val["atol"]))
    return _DEFAULT_TOL, _DEFAULT_TOL


class Tensors:
    """Lazily loaded safetensors files of one fixtures directory."""

    def __init__(self, root: Path):
        self.root = root
        self._files: dict[str, dict] = {}

    def file(self, name: str) -> dict:
        if name not in self._files:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            path = self.root / name
            if not path.is_file():
                raise FixturesError(f"tensor file {str(path)!r} named by the manifest does not exist")
            try:
                self._files[name] = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise FixturesError(f"cannot read tensor file {str(path)!r}: {exc}") from exc
        return self._files[name]

    def get(self, file: str, ref: str, batch: int | None = None):
        """Tensor ``ref`` of ``file``; a ref with a suffix (``"key [first 1 of batch]"``) keeps ``batch``
        items (everything after the first space is the suffix)."""
        key, _, suffix = ref.partition(" ")
        tensors = self.file(file)
        if key not in tensors:
            raise FixturesError(f"tensor {key!r} is not in {file!r}")
        t = tensors[key]
        if suffix.startswith("[batch ") and suffix.endswith("]"):  # "[batch a:b]": images a .. b-1
            start, _, stop = suffix[len("[batch ") : -1].partition(":")
            try:
                return t[int(start) : int(stop)]
            except ValueError:
                raise FixturesError(f"input ref {ref!r}: cannot parse the batch range") from None
        if suffix:
            if batch is None:
                raise FixturesError(f"input ref {ref!r} has a batch suffix but its case has no 'batch' field")
            t = t[:batch]
        return t


class Comparator:
    """Compares one output against its expected tensor into a :class:`CaseResult`."""

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol

    def compare(self, result: CaseResult, name: str, actual, expected) -> None:
        import torch

        actual = torch.as_tensor(actual).detach().cpu()
        expected = expected.detach().cpu()
        if name in _LABEL_OUTPUTS:
            actual = actual.reshape(-1, *actual.shape[-2:]) if actual.dim() >= 2 else actual
            expected = expected.reshape(-1, *expected.shape[-2:]) if expected.dim() >= 2 else expected
        if tuple(actual.shape) != tuple(expected.shape):
            result.failures.append(f"{name} shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
            result.diffs[name] = math.inf
            return
        if name in _LABEL_OUTPUTS:
            n = int((actual.to(torch.int64) != expected.to(torch.int64)).sum())
            result.mismatched[name] = n
            if n:
                result.failures.append(name)
            return
        a, e = actual.to(torch.float64), expected.to(torch.float64)
        if not torch.isfinite(a).all():
            result.diffs[name] = math.inf
            result.failures.append(f"{name} (non-finite values)")
            return
        err = (a - e).abs()
        diff = float(err.max()) if err.numel() else 0.0
        result.diffs[name] = diff
        if bool((err > self.atol + self.rtol * e.abs()).any()):
            result.failures.append(name)
