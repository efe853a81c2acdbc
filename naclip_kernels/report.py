"""Static resource report of the Triton kernels, built without a GPU: ``python -m naclip_kernels.report``.

Compiles every forward and backward kernel config (those the autotuners may launch) ahead of time for sm_80 /
sm_90 with the wheel's ``ptxas`` and reads the cubin with its ``cuobjdump``: registers, spills (stack + local
bytes, LDL/STL count), shared memory, tensor-core MMAs and ``MUFU.EX2`` count with the bias on and off.
``--check`` exits 1 listing each problem: a compile error, fp16/bf16 D=64 spills, shared memory over the
target's limit, no tensor-core op in fp16/bf16 SASS, or ``MUFU.EX2`` with bias > 1.10x without (per kernel).
Measurements go to ``docs``/``bench/results``, never into code.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Variant",
    "check_rows",
    "compile_variant",
    "main",
    "parse_resource_usage",
    "parse_sass",
    "variants",
]

#: Max shared memory per block (opt-in), bytes: sm_80 163 KB, sm_90 227 KB (CUDA programming guide).
SMEM_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TC_REQUIRED = {80: "HMMA", 86: "HMMA", 89: "HMMA", 90: "HGMMA"}
EX2_RATIO_LIMIT = 1.10
#: Kernels: name -> (function in naclip_kernels.triton.fwd/bwd, bias variants compiled).
KERNELS = {
    "fwd": ("attn_fwd_kernel", ("off", "on")),
    "dkdv": ("attn_bwd_dkdv_kernel", ("off", "on")),
    "dq": ("attn_bwd_dq_kernel", ("off", "on", "grad")),
}
_DTYPE_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_IN_DTYPE_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
_FP32_PTRS = {"LSE", "DELTA", "T", "G", "GD2", "DSG", "DSGD2"}  # tables and row statistics; ROWS is int32
_FP32_SCALARS = {"qk_scale", "sm_scale"}
_RES_FUNC_RE = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$")
_RES_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_SASS_INSTR_RE = re.compile(
    r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
)
_SASS_ARCH_RE = re.compile(r"code for (sm_\d+[a-z]?)")


def parse_resource_usage(text: str) -> dict[str, int]:
    """Integer fields of the first ``Function <name>:`` block of ``cuobjdump --dump-resource-usage``
    (``REG``, ``STACK``, ``SHARED``, ``LOCAL``, ...). ValueError when there is none."""
    fields: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        if _RES_FUNC_RE.match(line):
            if inside:
                break
            inside = True
        elif inside:
            fields.update({k: int(v) for k, v in _RES_FIELD_RE.findall(line)})
    if not fields:
        raise ValueError(f"no 'Function <name>:' block in cuobjdump resource-usage output: {text[:200]!r}")
    return fields


def parse_sass(text: str) -> tuple[str, Counter]:
    """``(arch, opcode counts)`` of ``cuobjdump -sass`` output; opcodes keep their modifiers (``MUFU.EX2``).
    ValueError when there is no instruction."""
    ops: Counter = Counter()
    arch = ""
    for line in text.splitlines():
        m = _SASS_INSTR_RE.match(line)
        if m:
            ops[m.group(1)] += 1
        elif not arch and (a := _SASS_ARCH_RE.search(line)):
            arch = a.group(1)
    if not ops:
        raise ValueError(f"no SASS instruction in cuobjdump -sass output: {text[:200]!r}")
    return arch, ops


def _count(ops: Counter, prefix: str) -> int:
    return sum(n for op, n in ops.items() if op == prefix or op.startswith(prefix + "."))


@dataclass(frozen=True)
class Variant:
    """One compile: kernel, target (80, 90), dtype name, head dim, bias (off / on / grad) and config."""

    kernel: str
    target: int
    dtype: str
    head_dim: int
    bias: str
    config: int
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return (
            f"{self.kernel} sm_{self.target} {self.dtype} D={self.head_dim} bias={self.bias} "
            f"config#{self.config}({self.BLOCK_M}x{self.BLOCK_N} w{self.num_warps} s{self.num_stages})"
        )


def variants(
    kernels: Sequence[str], targets: Sequence[int], dtypes: Sequence[str], head_dims: Sequence[int]
) -> list[Variant]:
    """Every admitted config (the autotuners' own pruning rules, at N = 16384) x bias variant."""
    import torch

    from .triton import configs as cf

    out = []
    for kernel in kernels:
        cfgs = cf.CONFIGS if kernel == "fwd" else cf.BWD_CONFIGS[kernel]
        for t in targets:
            for dt in dtypes:
                tdt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt])
                for hd in head_dims:
                    for i, c in enumerate(cfgs):
                        for bias in KERNELS[kernel][1]:
                            kw = {"dtype": tdt, "head_dim": hd, "has_bias": bias != "off", "n": 16384}
                            ok = (
                                cf.config_allowed(c, **kw)
                                if kernel == "fwd"
                                else cf.bwd_config_allowed(c, kernel=kernel, **kw, bias_grad=bias == "grad")
                            )
                            if ok:
                                out.append(Variant(kernel, t, dt, hd, bias, i, **c))
    return out


def _example_ints(head_dim: int) -> dict[str, int]:
    """Integer arguments at a typical launch (ViT-B/16 key-key attention at 448 px: 12 heads, 28x28 grid +
    CLS, q = k and v views of a packed ``[B, N, 3, H, D]`` qkv, contiguous outputs and dO, shared tables);
    the JIT's divisibility-by-16 hints follow from these values."""
    H, P, gh, gw, D = 12, 1, 28, 28, head_dim
    N = P + gh * gw
    packed = {"b": N * 3 * H * D, "h": D, "n": 3 * H * D}
    contiguous = {"b": H * N * D, "h": N * D, "n": D}
    vals = {f"stride_{t}{a}": v for t in "qkv" for a, v in packed.items()}
    vals.update({f"stride_{t}{a}": v for t in ("o", "do") for a, v in contiguous.items()})
    vals.update(stride_th=0, stride_rh=0, stride_gh=0, H=H, N=N, N_BUCKET=1024, P=P, GH=gh, GW=gw)
    return vals


def _signature(fn, v: Variant) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``ASTSource``: input-dtype pointers for the q/k/v/o/grad
    tensors, fp32 for tables and row statistics, int32 radii, fp32 scales, feature strides specialised to 1,
    every other integer i32 (``P`` kept runtime so the report covers every prefix count)."""
    import torch

    from .triton import configs as cf

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[v.dtype]
    constexprs = {
        "HEAD_DIM": v.head_dim, "BLOCK_D": cf.block_d(v.head_dim), "BLOCK_M": v.BLOCK_M, "BLOCK_N": v.BLOCK_N,
        "HAS_BIAS": v.bias != "off", "Q_IS_K": True, "IEEE": v.dtype == "fp32",
        "GATHER_BRANCH": cf.installed_gather_branch(tdt), "STORE_LSE": True, "BIAS_GRAD": v.bias == "grad",
    }  # fmt: skip
    ints = _example_ints(v.head_dim)
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], cx[name] = "constexpr", constexprs[name]
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name], cx[name] = "constexpr", 1
        elif name in _IN_DTYPE_PTRS or name in _FP32_PTRS or name == "ROWS":
            sig[name] = (
                _DTYPE_PTR[v.dtype] if name in _IN_DTYPE_PTRS else ("*i32" if name == "ROWS" else "*fp32")
            )
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if ints.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def find_cuobjdump() -> str:
    """``$TRITON_CUOBJDUMP_PATH``, the Triton wheel's ``backends/nvidia/bin/cuobjdump``, or ``PATH``."""
    import triton

    for c in (
        os.environ.get("TRITON_CUOBJDUMP_PATH"),
        str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"),
        shutil.which("cuobjdump"),
    ):
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("cuobjdump not found (triton wheel, PATH, $TRITON_CUOBJDUMP_PATH)")


def _tool(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-400:]}")
    return proc.stdout


def compile_variant(v: Variant) -> dict:
    """Compile one variant and read its resources; a failure goes into the row's ``error`` (never raises)."""
    row: dict = {**asdict(v), "target": f"sm_{v.target}", "smem_limit": SMEM_LIMITS[v.target], "error": ""}
    row["label"] = v.label()
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from .triton import bwd, fwd

        fn = getattr(fwd if v.kernel == "fwd" else bwd, KERNELS[v.kernel][0])
        sig, cx, attrs = _signature(fn, v)
        opts = {"num_warps": v.num_warps, "num_stages": v.num_stages}
        src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", v.target, 32), options=opts)
        with tempfile.TemporaryDirectory(prefix="naclip_report_") as d:
            cubin = Path(d) / "k.cubin"
            cubin.write_bytes(k.asm["cubin"])
            res = parse_resource_usage(_tool(find_cuobjdump(), "--dump-resource-usage", str(cubin)))
            arch, ops = parse_sass(_tool(find_cuobjdump(), "-sass", str(cubin)))
        tc = {p: _count(ops, p) for p in ("HGMMA", "HMMA") if _count(ops, p)}
        row.update(
            arch=arch, regs=res.get("REG"), spill_bytes=res.get("STACK", 0) + res.get("LOCAL", 0),
            lmem_ops=_count(ops, "LDL") + _count(ops, "STL"),
            smem_bytes=int(getattr(k.metadata, "shared", 0) or 0) + res.get("SHARED", 0),
            tc_op="+".join(tc) or "none", tc_count=sum(tc.values()), ex2=_count(ops, "MUFU.EX2"),
        )  # fmt: skip
    except Exception as exc:  # reported per row, the sweep goes on
        cause = exc.__cause__ or exc  # CompilationError: the underlying error says what is wrong
        row["error"] = f"{type(cause).__name__}: {' '.join(str(cause).split())[:400]}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # an interpreted kernel has no cubin


def run(vs: Sequence[Variant], jobs: int) -> list[dict]:
    """Compile ``vs`` in a spawned process pool; rows in the order of ``vs``, with ``ex2_ratio`` (EX2 with
    bias / the same kernel, target, dtype, D and config without) filled in."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, min(jobs, len(vs))), ctx, _worker_init) as pool:
        rows = list(pool.map(compile_variant, vs))
    off = {
        (r["kernel"], r["target"], r["dtype"], r["head_dim"], r["config"]): r
        for r in rows
        if r["bias"] == "off"
    }
    for r in rows:
        base = off.get((r["kernel"], r["target"], r["dtype"], r["head_dim"], r["config"]))
        ok = base is not None and r.get("ex2") is not None and base.get("ex2")
        r["ex2_ratio"] = round(r["ex2"] / base["ex2"], 4) if ok else None
    return rows


def check_rows(rows: Sequence[dict], *, ex2_ratio_limit: float = EX2_RATIO_LIMIT) -> list[str]:
    """One ``"<variant>: <reason>"`` line per violation of the ``--check`` criteria (empty: pass)."""
    fails = []
    for r in rows:
        label = r["label"]
        if r["error"]:
            fails.append(f"{label}: does not compile: {r['error']}")
            continue
        low = r["dtype"] in ("fp16", "bf16")
        if low and r["head_dim"] == 64 and (r["lmem_ops"] or r["spill_bytes"]):
            fails.append(
                f"{label}: spills {r['spill_bytes']} B/thread ({r['lmem_ops']} LDL/STL, {r['regs']} regs)"
            )
        if r["smem_bytes"] > r["smem_limit"]:
            fails.append(f"{label}: shared memory {r['smem_bytes']} B > limit {r['smem_limit']} B")
        want = _TC_REQUIRED.get(int(r["target"][3:]))
        if low and want and want not in r["tc_op"].split("+"):
            fails.append(f"{label}: no {want} in the SASS (found {r['tc_op']})")
        if r["ex2_ratio"] is not None and r["ex2_ratio"] > ex2_ratio_limit:
            fails.append(
                f"{label}: MUFU.EX2 with bias {r['ex2_ratio']:.3f}x without (limit {ex2_ratio_limit})"
            )
    return fails


_COLUMNS = (
    "kernel", "target", "arch", "dtype", "head_dim", "bias", "config", "BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages", "regs", "spill_bytes", "lmem_ops", "smem_bytes", "smem_limit", "tc_op", "tc_count", "ex2",
    "ex2_ratio", "compile_s", "error",
)  # fmt: skip


def to_markdown(rows: Sequence[dict], meta: dict, fails: Sequence[str]) -> str:
    cols = _COLUMNS[:-2]
    lines = [
        "# Triton kernel resource report (ahead-of-time, no GPU)",
        "",
        f"triton {meta['triton']}, torch {meta['torch']}, git {meta['git_sha']}, {meta['time']}; "
        f"command: `{meta['command']}`.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join("—" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    lines += ["", f"Check: {'PASS' if not fails else 'FAIL'}", *[f"- {f}" for f in fails]]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _meta(argv: Sequence[str]) -> dict:
    import torch
    import triton

    try:
        sha = _tool("git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD").strip()
    except Exception:  # not a checkout
        sha = None
    return {
        "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "git_sha": sha, "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python -m naclip_kernels.report " + " ".join(argv),
    }  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m naclip_kernels.report", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 on a violated criterion (see module doc)")
    p.add_argument("--kernels", default="fwd,dkdv,dq", help="comma list of fwd, dkdv, dq")
    p.add_argument("--targets", default="80,90", help="compute capabilities, or 'native' (the local GPU)")
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="directory for report.{csv,md,json}"
    )
    p.add_argument("--no-save", action="store_true", help="print only")
    a = p.parse_args(argv)
    a.kernels = [k for k in a.kernels.split(",") if k]
    if bad := [k for k in a.kernels if k not in KERNELS]:
        p.error(f"--kernels: expected names from {list(KERNELS)}; got {bad}")
    if a.targets == "native":
        import torch

        if not torch.cuda.is_available():
            p.error("--targets native needs a CUDA GPU")
        major, minor = torch.cuda.get_device_capability()
        a.targets = [major * 10 + minor]
    else:
        a.targets = _ints(a.targets)
    if bad := [t for t in a.targets if t not in SMEM_LIMITS]:
        p.error(f"--targets: expected compute capabilities from {sorted(SMEM_LIMITS)}; got {bad}")
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    if bad := [d for d in a.dtypes if d not in _DTYPE_PTR]:
        p.error(f"--dtypes: expected names from {list(_DTYPE_PTR)}; got {bad}")
    a.head_dims = _ints(a.head_dims)
    if not a.head_dims or any(not 1 <= h <= 128 for h in a.head_dims):
        p.error(f"--head-dims: expected integers in [1, 128]; got {a.head_dims}")
    if a.jobs < 1:
        p.error(f"--jobs: expected a positive integer; got {a.jobs}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parse_args(argv)
    rows = run(variants(a.kernels, a.targets, a.dtypes, a.head_dims), a.jobs)
    fails = check_rows(rows)
    meta = _meta(argv)
    md = to_markdown(rows, meta, fails)
    print(md)
    if not a.no_save:
        a.out.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        _atomic_write(a.out / "report.csv", buf.getvalue())
        _atomic_write(a.out / "report.md", md)
        _atomic_write(
            a.out / "report.json", json.dumps({"meta": meta, "rows": rows, "failures": fails}, indent=1)
        )
    return 1 if a.check and fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
