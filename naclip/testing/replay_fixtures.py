"""Replay a golden-fixtures directory through naclip's public API and report every case.

Usage::

    python -m naclip.testing.replay_fixtures DIR [--backend reference|torch|triton] [--kinds KIND ...]
                                                 [--match GLOB] [--device cpu|cuda] [--quiet]

``DIR`` holds a ``manifest.json`` and the ``*.safetensors`` files it names (the format of
``../shared/reference/fixtures``; see ``naclip-spec.md`` section 8). The tiny ViT is built from the manifest's
``"model"`` block by :func:`naclip.testing.tiny.build_visual_from_manifest` (heads, width, patch size, layers
and output dim come from the manifest, never from assumptions). Every case kind runs through the public API:

=================  ===================================================================================
kind               computed with
=================  ===================================================================================
``dense_forward``  :class:`naclip.model.NaclipVisual` ``forward`` (``dense``), ``last_block_input``
                   (``last_block_in``) and ``forward_last_block`` (``pre_ln_post``) when the case has them
``pos_embed``      ``NaclipVisual.interpolate_pos_embed(gh, gw)``
``gaussian_bias``  :func:`naclip_kernels.gaussian_bias`
``kernel``         the :mod:`naclip.strategies` attention function on ``q, k, v`` split from
                   ``F.linear(x, in_proj_weight, in_proj_bias)``, heads merged (``out_pre_proj``), then
                   ``out_proj`` (``out``); ``attn_probs`` via :func:`naclip_kernels.reference_attention_probs`
``pipeline``       :meth:`naclip.Segmenter.predict_from_features` (``seg_probs``, ``pred`` exact)
``pamr``           :func:`naclip.pamr.pamr`
=================  ===================================================================================

A manifest with a ``method`` field other than NACLIP (the ``../shared/reference/addons/<method>`` fixtures of
ClearCLIP, SCLIP, ResCLIP and SC-CLIP) runs its ``dense_forward``, ``dense_forward_raises`` and ``pipeline``
cases through the method adapters of :mod:`naclip.testing.replay_methods`. The manifest's ``weights`` field
(default ``weights.safetensors``) is a path relative to the manifest.

One line is printed per case with its maximum absolute difference (and, for label maps, the number of
mismatched pixels), then ``N cases, M failed, max abs diff X``. The exit status is 1 when any case exceeds the
manifest's fp32 tolerance (``|actual - expected| <= atol + rtol * |expected|``; label maps must match exactly)
or raises (the error message is reported and the remaining cases still run), 2 for a missing or invalid
directory.

Programmatic use: :func:`replay` returns one :class:`CaseResult` per case.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "CASE_KINDS",
    "CaseResult",
    "FixturesError",
    "load_manifest",
    "main",
    "replay",
    "summary_line",
]

CASE_KINDS = (
    "dense_forward",
    "dense_forward_raises",
    "pos_embed",
    "gaussian_bias",
    "kernel",
    "pipeline",
    "pamr",
)
BACKENDS = ("reference", "torch", "triton")
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


# --------------------------------------------------------------------------------------------- manifest I/O


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


def _fp32_tolerance(manifest: dict) -> tuple[float, float]:
    """(atol, rtol) of the manifest's fp32 recommendation (default 1e-4 / 1e-4)."""
    tol = manifest.get("tolerances", {})
    rec = {**tol.get("recommended", {}), **{k: v for k, v in tol.items() if k.lower().startswith("fp32")}}
    for key, val in rec.items():
        if key.lower().startswith("fp32") and isinstance(val, dict) and "atol" in val:
            return float(val["atol"]), float(val.get("rtol", val["atol"]))
    return _DEFAULT_TOL, _DEFAULT_TOL


class _Tensors:
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


# ---------------------------------------------------------------------------------------------- comparison


class _Comparator:
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


# ----------------------------------------------------------------------------------------------- the cases


class _Runner:
    """Holds the fixtures, the tiny model (built once) and the per-kind case functions."""

    def __init__(self, root: Path, manifest: dict, backend: str, device: str):
        import torch

        self.torch = torch
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.device = torch.device(device)
        self.tensors = _Tensors(root)
        from naclip.inference import CLIP_MEAN, CLIP_STD

        conv = manifest.get("conventions", {}).get("image_normalisation", {})
        if not isinstance(conv, dict):  # the add-on manifests state it in words ("identical to ...")
            conv = {}
        for key, ours in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
            theirs = conv.get(key, ours)
            same = len(theirs) == len(ours) and torch.equal(
                torch.tensor(theirs, dtype=torch.float32), torch.tensor(ours, dtype=torch.float32)
            )
            if not same:
                raise FixturesError(
                    f"manifest conventions.image_normalisation.{key}: expected naclip.inference.CLIP_"
                    f"{key.upper()} = {list(ours)} (float32), got {theirs!r}"
                )
        self._visual = None
        from naclip.testing.replay_methods import adapter_for

        self.adapter = adapter_for(manifest)

    def run(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        """Run one case: the method adapter's function for this kind, else NACLIP's."""
        kind = case["kind"]
        if self.adapter is not None:
            if kind not in self.adapter:
                raise FixturesError(f"case kind {kind!r} is not supported for this method")
            return self.adapter[kind](self, case, emit)
        if kind == "dense_forward_raises":
            raise FixturesError("dense_forward_raises cases exist only for add-on methods")
        return getattr(self, kind)(case, emit)

    # -- shared helpers

    def normalise(self, u8):
        """uint8 RGB ``[B,3,H,W]`` -> float32 ``(x - CLIP_MEAN) / CLIP_STD``
        (:func:`naclip.inference.normalize`; the manifest's conventions were checked to hold these values)."""
        from naclip.inference import normalize

        if u8.dim() != 4 or u8.shape[1] != 3:
            raise FixturesError(f"expected a uint8 image [B, 3, H, W], got shape {tuple(u8.shape)}")
        return normalize(u8.to(self.torch.float32)).to(self.device)

    def visual(self):
        """The open_clip VisionTransformer built from the manifest's model block (built once)."""
        if self._visual is None:
            from naclip.testing.tiny import build_visual_from_manifest

            if "model" not in self.manifest:
                raise FixturesError("manifest has no 'model' block; cannot build the tiny ViT")
            weights = self.tensors.file(str(self.manifest.get("weights", "weights.safetensors")))
            self._visual = build_visual_from_manifest(self.manifest["model"], weights).to(self.device).eval()
        return self._visual

    def naclip_visual(self, case: dict):
        from naclip.model import NaclipVisual

        kw: dict[str, Any] = {
            "arch": case.get("arch", "reduced"),
            "strategy": case.get("attn_strategy", "naclip"),
        }
        if case.get("gaussian_std") is not None:
            kw["gaussian_std"] = float(case["gaussian_std"])
        return NaclipVisual(self.visual(), backend=self.backend, **kw)

    def inp(self, case: dict, name: str):
        return self.tensors.get(case["file"], case["inputs"][name], case.get("batch"))

    def out(self, case: dict, name: str):
        return self.tensors.get(case["file"], case["outputs"][name])

    # -- kinds

    def dense_forward(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        torch = self.torch
        nv = self.naclip_visual(case)
        images = self.normalise(self.inp(case, "image"))
        outputs = case["outputs"]
        with torch.no_grad():
            emit("dense", nv(images))
            if "last_block_in" in outputs or "pre_ln_post" in outputs:
                x_in = nv.last_block_input(images)
                if "last_block_in" in outputs:
                    emit("last_block_in", x_in)
                if "pre_ln_post" in outputs:
                    emit("pre_ln_post", nv.forward_last_block(x_in, tuple(case["grid_hw"])))

    def pos_embed(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        gh, gw = case["grid_hw"]
        nv = self.naclip_visual(case)
        with self.torch.no_grad():
            pe = nv.interpolate_pos_embed(int(gh), int(gw))
        emit("pos_embed", pe.reshape(1, -1, pe.shape[-1]))

    def gaussian_bias(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        import naclip_kernels

        grid = tuple(int(g) for g in case["grid_hw"])
        emit("addition", naclip_kernels.gaussian_bias(grid, float(case["gaussian_std"]), num_prefix_tokens=1))

    def kernel(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        import torch.nn.functional as F

        from naclip import strategies

        torch = self.torch
        x = self.inp(case, "x").to(self.device)
        w_in = self.inp(case, "in_proj_weight").to(self.device)
        b_in = self.inp(case, "in_proj_bias").to(self.device)
        heads = int(case["num_heads"])
        B, T, E = x.shape
        if E % heads:
            raise FixturesError(f"embed dim {E} is not divisible by num_heads {heads}")
        d = E // heads
        grid = tuple(int(g) for g in case["grid_hw"])
        if 1 + grid[0] * grid[1] != T:
            raise FixturesError(f"grid {grid} does not match {T} tokens (1 + gh*gw)")
        std = case.get("gaussian_std")
        name = case["attn_strategy"]
        # [B, T, 3E] -> three [B, H, T, d] strided views (no copies)
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in F.linear(x, w_in, b_in).chunk(3, -1))
        with torch.no_grad():
            strategy = strategies.get_strategy(name)
            attn = strategy(q, k, v, grid, std, self.backend)
            out_pre = attn.transpose(1, 2).reshape(B, T, E)
            emit("out_pre_proj", out_pre)
            if "out" in case["outputs"]:
                w_out = self.inp(case, "out_proj_weight").to(self.device)
                b_out = self.inp(case, "out_proj_bias").to(self.device)
                emit("out", F.linear(out_pre, w_out, b_out))
            if "attn_probs" in case["outputs"]:
                # the float32 softmax matrix from naclip_kernels.reference_attention_probs, per the strategy
                emit("attn_probs", strategy.probs(q, k, grid, std))
            if "nonly_bias_multiplier" in case:
                emit("nonly_bias_multiplier", strategies.nonly_bias_multiplier(q, k)[:1])

    def pipeline(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        from naclip.segmenter import Segmenter

        torch = self.torch
        kw: dict[str, Any] = {
            "method": case.get("attn_strategy", "naclip"),
            "arch": case.get("arch", "reduced"),
        }
        if case.get("gaussian_std") is not None:
            kw["gaussian_std"] = float(case["gaussian_std"])
        seg = Segmenter(self.visual(), None, backend=self.backend, **kw)  # a bare image tower: features only
        image = self.normalise(self.inp(case, "image"))
        feats = self.inp(case, "query_features").to(self.device)
        qidx = self.inp(case, "query_idx").to(torch.int64)
        crop = int(case.get("slide_crop", 0) or 0)
        opts: dict[str, Any] = {
            "ori_shape": tuple(int(s) for s in case["ori_shape"]),
            "mode": "slide" if crop > 0 else "whole",
            "pamr_steps": int(case.get("pamr_steps", 0)),
            "pamr_dilations": tuple(int(d) for d in case.get("pamr_dilations", (8, 16))),
            "prob_thd": float(case.get("prob_thd", 0.0)),
            "return_logits": True,
        }
        if "num_classes" in case:
            opts["num_classes"] = int(case["num_classes"])
        if "logit_scale" in case:
            opts["logit_scale"] = float(case["logit_scale"])
        if crop > 0:
            opts["crop"] = crop
            opts["stride"] = int(case.get("slide_stride", crop // 2))
        with torch.no_grad():
            res = seg.predict_from_features(image, feats, qidx, **opts)
        emit("seg_probs", res.probs)
        emit("pred", res.labels)
        emit("slide_logits", res.logits[None])  # [Q, H, W] -> [1, Q, H, W]

    def pamr(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        from naclip.pamr import pamr

        image = self.inp(case, "image").to(self.device)
        mask = self.inp(case, "mask").to(self.device)
        with self.torch.no_grad():
            out = pamr(image, mask, num_iter=int(case["num_iter"]), dilations=tuple(case["dilations"]))
        emit("out", out)


# --------------------------------------------------------------------------------------------- entry points


def replay(
    fixtures_dir: str | os.PathLike,
    backend: str = "torch",
    *,
    kinds: Iterable[str] | None = None,
    match: str | None = None,
    device: str = "cpu",
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run every case of ``fixtures_dir`` (optionally only ``kinds`` / ids matching the glob ``match``).

    Args:
        fixtures_dir: directory with ``manifest.json`` and the ``*.safetensors`` files it names.
        backend: attention backend for the model, kernel and pipeline cases: ``"reference"``, ``"torch"`` or
            ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``, set before triton is imported).
        kinds: case kinds to run (default all of :data:`CASE_KINDS`).
        match: ``fnmatch`` glob on case ids (e.g. ``"kernel/*g5x7*"``).
        device: torch device (with ``"cuda"``, TF32 is disabled for the run, as the fixtures need).
        on_result: called with each :class:`CaseResult` as soon as it is known (for streaming output).

    Returns:
        One :class:`CaseResult` per selected case, in manifest order. A case that raises is reported as failed
        with its message; the others still run.

    Raises:
        FixturesError: missing/invalid directory or manifest, or nothing selected.
        ValueError: unknown backend or kind.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    wanted = tuple(kinds) if kinds is not None else CASE_KINDS
    unknown = [k for k in wanted if k not in CASE_KINDS]
    if unknown:
        raise ValueError(f"kinds must be among {', '.join(CASE_KINDS)}; got unknown {unknown}")
    root = Path(fixtures_dir)
    manifest = load_manifest(root)
    cases = [
        c
        for c in manifest["cases"]
        if c["kind"] in wanted and (match is None or fnmatch.fnmatch(c["id"], match))
    ]
    if not cases:
        raise FixturesError(
            f"no case selected in {str(root)!r} (kinds={list(wanted)}, match={match!r}; "
            f"{len(manifest['cases'])} cases in the manifest)"
        )
    unsupported = sorted({c["kind"] for c in cases} - set(CASE_KINDS))
    if unsupported:
        raise FixturesError(f"manifest has case kinds this replay does not know: {unsupported}")

    import torch

    atol, rtol = _fp32_tolerance(manifest)
    cmp = _Comparator(atol, rtol)
    runner = _Runner(root, manifest, backend, device)
    results: list[CaseResult] = []
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for case in cases:
            res = CaseResult(case_id=case["id"], kind=case["kind"], passed=False)
            expected_outputs = dict(case.get("outputs", {}))

            def emit(name: str, actual, _case=case, _res=res, _exp=expected_outputs) -> None:
                if name == "nonly_bias_multiplier":
                    cmp.compare(_res, name, actual, torch.tensor([float(_case[name])], dtype=torch.float64))
                    return
                if name not in _exp and isinstance(_case.get(name), list):  # expected value in the manifest
                    cmp.compare(_res, name, actual, torch.tensor(_case[name]))
                    return
                if name not in _exp:
                    return
                cmp.compare(_res, name, actual, runner.out(_case, name))
                _exp.pop(name)

            try:
                runner.run(case, emit)
                res.max_abs_diff = max(res.diffs.values(), default=0.0)
                if expected_outputs:  # every stored output must be checked
                    res.failures.append("not computed: " + ", ".join(expected_outputs))
                res.passed = not res.failures
            except Exception as exc:  # noqa: BLE001 - every case error is reported, the run continues
                res.error = _describe(exc)
                res.passed = False
            results.append(res)
            if on_result is not None:
                on_result(res)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return results


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        last = tb[-1]
        text += f" (at {Path(last.filename).name}:{last.lineno})"
    return text


def summary_line(results: Sequence[CaseResult]) -> str:
    """``N cases, M failed, max abs diff X``."""
    failed = sum(not r.passed for r in results)
    diffs = [r.max_abs_diff for r in results if r.error is None]
    worst = max(diffs) if diffs else 0.0
    return f"{len(results)} cases, {failed} failed, max abs diff {worst:.3g}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m naclip.testing.replay_fixtures",
        description="Replay golden fixtures (manifest.json + safetensors) through naclip's public API.",
    )
    p.add_argument("fixtures_dir", metavar="DIR", help="fixtures directory holding manifest.json")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="attention backend (default: torch)")
    p.add_argument("--kinds", nargs="+", choices=CASE_KINDS, metavar="KIND", help=f"case kinds: {CASE_KINDS}")
    p.add_argument("--match", metavar="GLOB", help="only case ids matching this glob, e.g. 'kernel/*g5x7*'")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="print only failing cases and the summary")
    return p


def _needs_interpreter(device: str) -> bool:
    """True when the triton backend would run on CPU without the interpreter enabled."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not str(device).startswith("cuda")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 all passed, 1 a case failed, 2 bad arguments/directory)."""
    args = _parser().parse_args(argv)
    if args.backend == "triton" and _needs_interpreter(args.device):
        if argv is None and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # in time: triton is imported after this point
        elif argv is None:
            # The interpreter mode is fixed when triton is imported, and importing this module's parent
            # packages (open_clip) already did: start again with the variable set.
            env = dict(os.environ, TRITON_INTERPRET="1")
            cmd = [sys.executable, "-m", "naclip.testing.replay_fixtures", *sys.argv[1:]]
            sys.stdout.flush()
            os.execve(sys.executable, cmd, env)
        else:
            print(
                "error: the triton backend on CPU needs TRITON_INTERPRET=1 in the environment before triton "
                "is imported (set it before starting Python)",
                file=sys.stderr,
            )
            return 2

    def show(res: CaseResult) -> None:
        if not (args.quiet and res.passed):
            print(res.line(), flush=True)

    try:
        results = replay(
            args.fixtures_dir,
            args.backend,
            kinds=args.kinds,
            match=args.match,
            device=args.device,
            on_result=show,
        )
    except (FixturesError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(results), flush=True)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
