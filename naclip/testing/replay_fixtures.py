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

Programmatic use: :func:`replay` returns one :class:`CaseResult` per case. The fixtures format (manifest,
tensors, comparison) lives in :mod:`naclip.testing.fixtures`, the NACLIP case kinds in
:mod:`naclip.testing.cases`. With ``--backend triton`` on a CPU without ``TRITON_INTERPRET=1`` the command
starts itself again with it set (torch imports triton at start-up, so it cannot be set later; see
``docs/package-layout.md``).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from naclip.testing.fixtures import CaseResult, Comparator, FixturesError, fp32_tolerance, load_manifest

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
    cases = _select(root, manifest, wanted, match)

    import torch

    from naclip.testing.cases import Runner

    cmp = Comparator(*fp32_tolerance(manifest))
    runner = Runner(root, manifest, backend, device)
    results: list[CaseResult] = []
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for case in cases:
            results.append(_run_case(runner, cmp, case))
            if on_result is not None:
                on_result(results[-1])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return results


def _select(root: Path, manifest: dict, wanted: tuple[str, ...], match: str | None) -> list[dict]:
    """The manifest's cases of the ``wanted`` kinds whose ids match the glob ``match``."""
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
    return cases


def _run_case(runner, cmp: Comparator, case: dict) -> CaseResult:
    """One case: every output the runner emits is compared with its stored (or manifest) value; an
    output stored but not computed, or an exception, fails the case."""
    import torch

    res = CaseResult(case_id=case["id"], kind=case["kind"], passed=False)
    expected = dict(case.get("outputs", {}))

    def emit(name: str, actual) -> None:
        if name == "nonly_bias_multiplier":
            cmp.compare(res, name, actual, torch.tensor([float(case[name])], dtype=torch.float64))
        elif name not in expected and isinstance(case.get(name), list):  # expected value in the manifest
            cmp.compare(res, name, actual, torch.tensor(case[name]))
        elif name in expected:
            cmp.compare(res, name, actual, runner.out(case, name))
            expected.pop(name)

    try:
        runner.run(case, emit)
        res.max_abs_diff = max(res.diffs.values(), default=0.0)
        if expected:  # every stored output must be checked
            res.failures.append("not computed: " + ", ".join(expected))
        res.passed = not res.failures
    except Exception as exc:  # noqa: BLE001 - every case error is reported, the run continues
        res.error = _describe(exc)
        res.passed = False
    return res


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
