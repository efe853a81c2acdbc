"""Static GPU-readiness report for the fused attention kernel, built without a GPU.

The Triton wheel ships NVIDIA's ``ptxas`` and ``cuobjdump``, so the fused kernel of
:mod:`naclip_kernels.triton_backend` compiles ahead of time for an A100 (``sm_80``) or an H100 (``sm_90``;
Triton emits ``sm_90a`` SASS there, shown in the ``arch`` column) on a CPU-only machine. For every variant

    autotune config (``CONFIGS``) x dtype (fp16, bf16, fp32) x head dim x bias off/on x target

this module calls ``triton.compile(ASTSource(_attn_fwd_kernel, signature, constexprs, attrs),
target=GPUTarget("cuda", cc, 32), options={"num_warps": ..., "num_stages": ...})``, with ``(signature,
constexprs)`` from the kernel module's ``aot_signature(dtype, head_dim, has_bias, q_is_k, config)`` and
``attrs`` from its ``aot_attrs(signature, constexprs)``: the divisibility-by-16 hints the JIT infers at a
typical launch (the kernel module applies the JIT's rule to a representative launch; for a module without
``aot_attrs``, every pointer and ``stride*`` integer argument; ``--no-align-hints`` drops them). Only the
configs the kernel's autotuner can launch are compiled: the kernel module's ``config_allowed(config, *,
dtype, head_dim, has_bias, n)`` (its autotune pruning rule) is asked per dtype, head dim and bias flag at a
large ``n``; ``--all-configs`` compiles every config anyway. The cubin goes to a temporary directory;
``cuobjdump`` reads it:

* ``--dump-resource-usage``: ``REG`` (registers/thread), ``STACK`` + ``LOCAL`` (local memory bytes/thread:
  the stack frame that holds register spills, plus ``.local`` data; column ``spill_bytes``) and ``SHARED``
  (static shared memory/block).
* ``-sass``: the SASS architecture, static instruction counts of ``MUFU.EX2`` (column ``ex2``), of local
  memory loads/stores ``LDL*``/``STL*`` (``lmem_ops``: spill traffic) and of tensor-core MMAs (``HMMA`` =
  ``mma.sync`` on sm_8x, ``HGMMA`` = ``wgmma`` on sm_90).

Shared memory per block (``smem_bytes``) = Triton's dynamic allocation (``metadata.shared``, the one resource
figure the compiled metadata holds without a driver) + the static ``SHARED``. Triton fills ``n_regs`` and
``n_spills`` only when it loads a cubin through the driver; when a GPU of exactly the target's compute
capability is present the cubin is loaded and those figures are shown (``drv_regs``, ``drv_spills`` = local
bytes / 4) and cross-checked against ``cuobjdump``.

``--check`` exits with status 1 and one line per problem (variant + reason) when: a variant does not compile;
an fp16/bf16 variant at head dim 64 has local-memory loads/stores (spills); shared memory exceeds the target's
per-block limit (163 KB = 166912 B on sm_80, 227 KB = 232448 B on sm_90); fp16/bf16 SASS lacks the target's
tensor-core instruction (HMMA on sm_8x, HGMMA on sm_90); ``MUFU.EX2`` with the Gaussian bias is more than 10 %
above the same config without it (a per-element ``exp`` for the bias would double it); or the driver's
register count differs from ``cuobjdump``'s. EX2 counts are static (instructions in the binary, not
executions). Both variants of a pair run the same loop structure, so their ratio measures the extra
exponentials per score tile. The compiler can still duplicate a loop body in one variant and not the other,
so ``ex2_per_mma_ratio`` (EX2 per tensor-core instruction, bias on/off) is shown too: it stays ~1 under such
duplication and rises only with real extra exponentials. The check uses ``ex2_ratio``.

Checking your own GPU build (the command CI runs; from the repository root)::

    python -m naclip_kernels.inspect --check --out /tmp/naclip-inspect          # sm_80 + sm_90, no GPU needed
    python -m naclip_kernels.inspect --check --targets native --out /tmp/naclip-inspect   # the local GPU

``native`` compiles for the local GPU and adds the driver cross-check. The report is written to ``--out``
(default ``bench/results``) as ``inspect_variants.csv``, ``inspect_report.md`` and ``inspect_report.json``
(triton/torch versions, git sha, timings); ``--no-save`` only prints. Compiles run in a spawned process pool
(``--jobs``, default: CPU count) whose workers drop ``TRITON_INTERPRET`` (a kernel defined under the
interpreter yields no cubin) and ``PYTEST_VERSION`` (so the full ``CONFIGS`` list is inspected). Compiled
kernels land in the Triton cache (a re-run is quick); ``--fresh-cache`` uses an empty one for cold timings.

Version notes: only API shared by triton 3.6 and 3.8 is used (``triton.compiler.ASTSource``,
``triton.backends.compiler.GPUTarget``, ``CompiledKernel.asm["cubin"]``, ``metadata.shared``, ``attrs`` keyed
by ``(arg index,)``). One version branch: ``ASTSource`` takes ``constexprs=`` (triton >= 3.2: 3.6, 3.8) or
``constants=`` (older); it is picked by inspecting the signature. The driver cross-check calls the private
``CompiledKernel._init_handles`` (3.6 and 3.8) and is skipped when that fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import importlib
import inspect as _pyinspect
import io
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COLUMNS",
    "DEFAULT_KERNEL_MODULE",
    "EX2_RATIO_LIMIT",
    "SMEM_LIMITS",
    "SassSummary",
    "Variant",
    "add_ex2_ratios",
    "build_variants",
    "check_rows",
    "find_cuobjdump",
    "main",
    "parse_resource_usage",
    "parse_sass",
    "run_sweep",
]

DEFAULT_KERNEL_MODULE = "naclip_kernels.triton_backend"
#: Max shared memory per block (opt-in), bytes, per compute capability (CUDA programming guide).
SMEM_LIMITS: dict[int, int] = {
    75: 65536,
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    103: 232448,
    120: 101376,
}
#: Tensor-core instruction required in fp16/bf16 SASS per compute capability (others: reported only).
_TC_REQUIRED: dict[int, str] = {75: "HMMA", 80: "HMMA", 86: "HMMA", 87: "HMMA", 89: "HMMA", 90: "HGMMA"}
_TC_PREFIXES = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA")
EX2_RATIO_LIMIT = 1.10
DTYPES = ("fp16", "bf16", "fp32")
_TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_STRIPPED_ENV = ("TRITON_INTERPRET", "PYTEST_VERSION")

CSV_NAME = "inspect_variants.csv"
MD_NAME = "inspect_report.md"
JSON_NAME = "inspect_report.json"

#: One row per variant (CSV header order).
COLUMNS = (
    "target",
    "arch",
    "dtype",
    "head_dim",
    "bias",
    "q_is_k",
    "config",
    "BLOCK_M",
    "BLOCK_N",
    "num_warps",
    "num_stages",
    "regs",
    "spill_bytes",
    "stack_bytes",
    "lmem_ops",
    "smem_bytes",
    "smem_dynamic",
    "smem_static",
    "smem_limit",
    "tc_op",
    "tc_count",
    "ex2",
    "ex2_ratio",
    "ex2_per_mma_ratio",
    "drv_regs",
    "drv_spills",
    "compile_s",
    "error",
)

USAGE_BLOCK = """\
How to check your own GPU build (the command CI runs; from the repository root):

    python -m naclip_kernels.inspect --check --out /tmp/naclip-inspect         # sm_80 + sm_90, no GPU needed
    python -m naclip_kernels.inspect --check --targets native --out /tmp/naclip-inspect   # the local GPU

It compiles every autotune config the kernel can launch (its config_allowed rule, per dtype/D/bias) x
fp16/bf16/fp32 x D=64,128 x bias off/on with the installed Triton and ptxas. Exit status 1 lists each
failing variant and the reason: compile error; spills (local-memory loads/stores) for fp16/bf16 at D=64;
shared memory over the per-block limit; no tensor-core instruction (HMMA on sm_8x, HGMMA on sm_90);
MUFU.EX2 count with bias > 1.10x without; driver vs cuobjdump register mismatch (native only). Narrow it
with e.g. `--targets 90 --dtypes fp16,bf16 --head-dims 64`; `--fresh-cache` gives cold compile timings;
`--help` lists the rest.
"""


# ----------------------------------------------------------------------------------------------------------
# cuobjdump output parsers
# ----------------------------------------------------------------------------------------------------------

_RES_FUNC_RE = re.compile(r"^\s*Function\s+(\S+?)\s*:\s*$")
_RES_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_SASS_ARCH_RE = re.compile(r"code for (sm_\d+[a-z]?)")
_SASS_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSTR_RE = re.compile(
    r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Parse ``cuobjdump --dump-resource-usage`` output.

    Returns ``{function name: {field: value}}``, the integer fields of each ``Function <name>:`` block, e.g.
    ``{"_attn_fwd_kernel": {"REG": 168, "STACK": 0, "SHARED": 0, "LOCAL": 0, "CONSTANT[0]": 552, ...}}``:
    ``REG`` registers per thread, ``STACK`` stack frame bytes per thread (where ptxas puts register spills),
    ``LOCAL`` other local memory bytes per thread, ``SHARED`` static shared memory bytes per block. The
    ``Common:`` block is skipped.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: no function block in ``text``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _RES_FUNC_RE.match(line)
        if m:
            current = m.group(1)
            out[current] = {}
        elif current is not None and line.strip():
            fields = _RES_FIELD_RE.findall(line)
            if not fields:
                current = None
            else:
                out[current].update({k: int(v) for k, v in fields})
    if not out:
        raise ValueError(f"no 'Function <name>:' block in cuobjdump resource-usage output: {text[:200]!r}")
    return out


@dataclass(frozen=True)
class SassSummary:
    """What :func:`parse_sass` extracts from ``cuobjdump -sass``.

    ``arches``: the ``code for sm_XX[a]`` targets in order; ``functions``: kernel names; ``opcodes``: static
    count of each full opcode with its modifiers (``MUFU.EX2``, ``HGMMA.64x64x16.F32``, ...), all functions.
    """

    arches: tuple[str, ...]
    functions: tuple[str, ...]
    opcodes: dict[str, int]

    def count(self, prefix: str) -> int:
        """Instructions whose opcode equals ``prefix`` or starts with ``prefix + "."``."""
        return sum(n for op, n in self.opcodes.items() if op == prefix or op.startswith(prefix + "."))

    @property
    def ex2(self) -> int:
        """Static number of ``MUFU.EX2`` instructions (any modifier)."""
        return self.count("MUFU.EX2")

    @property
    def local_memory_ops(self) -> int:
        """Static number of local-memory loads and stores (``LDL*``, ``STL*``): spill traffic."""
        return self.count("LDL") + self.count("STL")

    def tensor_core_ops(self) -> dict[str, int]:
        """``{base opcode: count}`` of tensor-core MMAs (HMMA, HGMMA, UTC*MMA) present; empty if none."""
        found = {p: self.count(p) for p in _TC_PREFIXES}
        return {p: n for p, n in found.items() if n}


def parse_sass(text: str) -> SassSummary:
    """Parse ``cuobjdump -sass`` output into a :class:`SassSummary`.

    Instruction lines look like ``/*0140*/  @!P0 MUFU.EX2 R3, R3 ;``: a predicate guard is skipped, the opcode
    with all its ``.``-modifiers is counted.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: ``text`` holds no SASS instruction.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    ops: Counter[str] = Counter()
    arches: list[str] = []
    funcs: list[str] = []
    for line in text.splitlines():
        m = _SASS_INSTR_RE.match(line)
        if m:
            ops[m.group(1)] += 1
            continue
        m = _SASS_ARCH_RE.search(line)
        if m:
            arches.append(m.group(1))
            continue
        m = _SASS_FUNC_RE.match(line)
        if m:
            funcs.append(m.group(1))
    if not ops:
        raise ValueError(f"no SASS instruction in cuobjdump -sass output: {text[:200]!r}")
    return SassSummary(tuple(arches), tuple(funcs), dict(ops))


def find_cuobjdump() -> Path:
    """Locate ``cuobjdump``: ``$TRITON_CUOBJDUMP_PATH``, then the Triton wheel's
    ``triton/backends/nvidia/bin/cuobjdump``, then ``PATH``.

    Raises:
        FileNotFoundError: none of them is an executable file (the message lists every place tried).
    """
    tried: list[str] = []
    candidates: list[Path] = []
    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    if env:
        candidates.append(Path(env))
    try:
        import triton

        candidates.append(
            Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        )
    except ImportError as exc:
        tried.append(f"the triton wheel (import failed: {exc})")
    which = shutil.which("cuobjdump")
    if which:
        candidates.append(Path(which))
    else:
        tried.append("PATH (no cuobjdump)")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
        tried.append(str(c))
    raise FileNotFoundError(
        "cuobjdump not found; tried: "
        + "; ".join(tried)
        + ". Install a triton wheel with the NVIDIA backend (it ships "
        "triton/backends/nvidia/bin/cuobjdump) or point TRITON_CUOBJDUMP_PATH at a cuobjdump binary."
    )


def _run_tool(args: Sequence[str]) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:-1])} failed with status {proc.returncode}: {proc.stderr[-400:]}"
        )
    return proc.stdout


# ----------------------------------------------------------------------------------------------------------
# Variants and the per-variant compile (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compile: target compute capability (80, 90, ...), dtype name (fp16/bf16/fp32), head dim, bias flag,
    q-is-k flag, and the autotune config (its index in ``CONFIGS`` and its values)."""

    target: int
    dtype: str
    head_dim: int
    bias: bool
    q_is_k: bool
    config: int
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def base_row(self) -> dict:
        """A row over :data:`COLUMNS` with this variant's fields set and every measurement ``None``."""
        row: dict = dict.fromkeys(COLUMNS)
        row.update(
            target=f"sm_{self.target}",
            dtype=self.dtype,
            head_dim=self.head_dim,
            bias=int(self.bias),
            q_is_k=int(self.q_is_k),
            config=self.config,
            BLOCK_M=self.BLOCK_M,
            BLOCK_N=self.BLOCK_N,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            smem_limit=SMEM_LIMITS[self.target],
            error="",
        )
        return row


def load_configs(kernel_module: str = DEFAULT_KERNEL_MODULE) -> list[dict]:
    """The kernel module's ``CONFIGS`` (copied), validated: each a dict with BLOCK_M, BLOCK_N, num_warps,
    num_stages. Raises ``ValueError`` naming the module and the bad entry."""
    mod = importlib.import_module(kernel_module)
    configs = getattr(mod, "CONFIGS", None)
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ValueError(
            f"{kernel_module}.CONFIGS must be a non-empty list of dicts with keys {list(_CONFIG_KEYS)}, "
            f"got {configs!r}"
        )
    out = []
    for i, c in enumerate(configs):
        if not isinstance(c, dict) or any(k not in c for k in _CONFIG_KEYS):
            raise ValueError(
                f"{kernel_module}.CONFIGS[{i}] must be a dict with keys {list(_CONFIG_KEYS)}, got {c!r}"
            )
        out.append(dict(c))
    return out


def autotune_keep(
    kernel_module: str = DEFAULT_KERNEL_MODULE,
) -> Callable[[str, int, int, bool], bool] | None:
    """``keep(dtype, head_dim, config_index, bias)``: whether the kernel's autotuner can launch that config,
    from the kernel module's public pruning rule ``config_allowed(config, *, dtype, head_dim, has_bias, n)``
    asked at a large ``n`` (16384 tokens, so no small-N pruning). ``None`` when the module has no
    ``config_allowed`` (then every config is compiled). Raises ``ValueError`` when ``config_allowed`` fails or
    admits no config at all for a dtype/head dim/bias flag (a broken rule, not a reason to compile all)."""
    import torch

    mod = importlib.import_module(kernel_module)
    allowed = getattr(mod, "config_allowed", None)
    if not callable(allowed):
        return None
    configs = load_configs(kernel_module)
    table: dict[tuple[str, int, bool], set[int]] = {}

    def keep(dtype: str, head_dim: int, index: int, bias: bool) -> bool:
        key = (dtype, int(head_dim), bool(bias))
        if key not in table:
            tdtype = getattr(torch, _TORCH_DTYPE_NAMES[dtype])
            try:
                kept = {
                    j
                    for j, c in enumerate(configs)
                    if allowed(dict(c), dtype=tdtype, head_dim=int(head_dim), has_bias=bool(bias), n=16384)
                }
            except Exception as exc:
                raise ValueError(
                    f"{kernel_module}.config_allowed failed for {dtype} D={head_dim} bias={bias}: {exc}"
                ) from exc
            if not kept:
                raise ValueError(
                    f"{kernel_module}.config_allowed admits no config for {dtype} D={head_dim} bias={bias}"
                )
            table[key] = kept
        return index in table[key]

    return keep


def build_variants(
    configs: Sequence[dict],
    *,
    targets: Iterable[int] = (80, 90),
    dtypes: Iterable[str] = DTYPES,
    head_dims: Iterable[int] = (64, 128),
    q_is_k: Iterable[bool] = (True,),
    config_indices: Iterable[int] | None = None,
    keep: Callable[[str, int, int, bool], bool] | None = None,
) -> list[Variant]:
    """targets x dtypes x head_dims x q_is_k x configs x bias (off, on), in that nesting order.

    ``config_indices`` restricts the configs (indices into ``configs``); ``keep(dtype, head_dim, index,
    bias)``, if given, drops the variants for which it returns False (see :func:`autotune_keep`), so a config
    may appear with the bias off only (its bias-off row then has no EX2 ratio).

    Raises ``ValueError`` naming the argument for an unknown dtype, a target without a known shared-memory
    limit, a non-positive head dim or an out-of-range config index.
    """
    dtypes = list(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"dtypes: expected a non-empty subset of {list(DTYPES)}, got {dtypes}")
    targets = [int(t) for t in targets]
    bad_t = [t for t in targets if t not in SMEM_LIMITS]
    if bad_t or not targets:
        raise ValueError(f"targets: expected compute capabilities from {sorted(SMEM_LIMITS)}, got {targets}")
    head_dims = [int(h) for h in head_dims]
    if not head_dims or any(h <= 0 for h in head_dims):
        raise ValueError(f"head_dims: expected positive integers, got {head_dims}")
    indices = list(range(len(configs))) if config_indices is None else [int(i) for i in config_indices]
    bad_i = [i for i in indices if not 0 <= i < len(configs)]
    if bad_i or not indices:
        raise ValueError(f"config_indices: expected indices in [0, {len(configs)}), got {indices}")
    out = []
    for t in targets:
        for dt in dtypes:
            for hd in head_dims:
                for qk in q_is_k:
                    for i in indices:
                        c = configs[i]
                        for bias in (False, True):
                            if keep is not None and not keep(dt, hd, i, bias):
                                continue
                            out.append(
                                Variant(
                                    target=t,
                                    dtype=dt,
                                    head_dim=hd,
                                    bias=bias,
                                    q_is_k=bool(qk),
                                    config=i,
                                    BLOCK_M=int(c["BLOCK_M"]),
                                    BLOCK_N=int(c["BLOCK_N"]),
                                    num_warps=int(c["num_warps"]),
                                    num_stages=int(c["num_stages"]),
                                )
                            )
    return out


_WORKER_MODULES: dict = {}


def _worker_init(env_set: dict[str, str], env_unset: Sequence[str]) -> None:
    for k in env_unset:
        os.environ.pop(k, None)
    os.environ.update(env_set)


def _jit_function(mod, kernel_module: str):
    from triton.runtime.jit import JITFunction

    fn = getattr(mod, "_attn_fwd_kernel", None)
    if fn is None:
        raise AttributeError(f"{kernel_module} has no _attn_fwd_kernel (the raw @triton.jit kernel)")
    for _ in range(4):  # unwrap @triton.autotune / @triton.heuristics wrappers
        if isinstance(fn, JITFunction) or not hasattr(fn, "fn"):
            break
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"{kernel_module}._attn_fwd_kernel must be a triton.jit function, got {type(fn).__name__} "
            "(is TRITON_INTERPRET set in the compiling process?)"
        )
    return fn


def _alignment_attrs(fn, signature: dict) -> dict:
    """Fallback for kernel modules without ``aot_attrs``: ``tt.divisibility=16`` on every pointer argument and
    every non-constexpr integer argument whose name starts with ``stride`` (what the JIT infers for 16-byte
    aligned tensors whose strides are multiples of 16, e.g. contiguous or packed layouts at D = 64/128).
    Keys are ``(argument index,)`` paths (the format of triton 3.6 and 3.8)."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        ty = signature.get(name)
        if isinstance(ty, str) and (ty.startswith("*") or (ty[:1] in "iu" and name.startswith("stride"))):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _ast_source(fn, signature: dict, constexprs: dict, attrs: dict | None = None):
    from triton.compiler import ASTSource

    params = _pyinspect.signature(ASTSource.__init__).parameters
    # The one version branch: triton >= 3.2 (3.6, 3.8) names it ``constexprs``, older releases ``constants``.
    kw = "constexprs" if "constexprs" in params else "constants"
    return ASTSource(fn, signature, **{kw: constexprs}, attrs=attrs)


def _driver_figures(compiled, target: int) -> tuple[int | None, int | None]:
    """(n_regs, n_spills) from loading the cubin through the driver; (None, None) unless a GPU of exactly
    this compute capability is present."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, None
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor != target:
            return None, None
        compiled._init_handles()
        return int(compiled.n_regs), int(compiled.n_spills)
    except Exception:  # best effort: the cuobjdump figures stand on their own
        return None, None


def _error_text(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 500:
        msg = msg[:250] + " ... " + msg[-250:]
    return f"{type(exc).__name__}: {msg}"


def _compile_variant(v: Variant, kernel_module: str, cuobjdump: str, align: bool = True) -> dict:
    """Compile one variant and read its resources. Never raises: a failure goes to the row's ``error``."""
    t0 = time.perf_counter()
    row = v.base_row()
    try:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget

        mod = _WORKER_MODULES.get(kernel_module)
        if mod is None:
            mod = _WORKER_MODULES[kernel_module] = importlib.import_module(kernel_module)
        config = dict(mod.CONFIGS[v.config])
        fn = _jit_function(mod, kernel_module)
        dtype = getattr(torch, _TORCH_DTYPE_NAMES[v.dtype])
        signature, constexprs = mod.aot_signature(dtype, v.head_dim, v.bias, v.q_is_k, config)
        attrs = None
        if align:
            aot_attrs = getattr(mod, "aot_attrs", None)
            attrs = (
                aot_attrs(signature, constexprs) if callable(aot_attrs) else _alignment_attrs(fn, signature)
            )
        src = _ast_source(fn, signature, constexprs, attrs)
        options = {k: config[k] for k in _OPTION_KEYS if k in config}
        compiled = triton.compile(src, target=GPUTarget("cuda", v.target, 32), options=options)
        with tempfile.TemporaryDirectory(prefix="naclip_inspect_") as d:
            path = Path(d) / "kernel.cubin"
            path.write_bytes(compiled.asm["cubin"])
            res = parse_resource_usage(_run_tool([cuobjdump, "--dump-resource-usage", str(path)]))
            sass = parse_sass(_run_tool([cuobjdump, "-sass", str(path)]))
        name = getattr(compiled.metadata, "name", None)
        usage = res[name] if name in res else next(iter(res.values()))
        smem_dynamic = int(getattr(compiled.metadata, "shared", 0) or 0)
        tc = sass.tensor_core_ops()
        drv_regs, drv_spills = _driver_figures(compiled, v.target)
        row.update(
            arch="+".join(dict.fromkeys(sass.arches)) or f"sm_{v.target}",
            regs=usage.get("REG"),
            spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
            stack_bytes=usage.get("STACK", 0),
            lmem_ops=sass.local_memory_ops,
            smem_dynamic=smem_dynamic,
            smem_static=usage.get("SHARED", 0),
            smem_bytes=smem_dynamic + usage.get("SHARED", 0),
            tc_op="+".join(tc) if tc else "none",
            tc_count=sum(tc.values()),
            ex2=sass.ex2,
            drv_regs=drv_regs,
            drv_spills=drv_spills,
        )
    except Exception as exc:  # reported per variant; the sweep goes on
        row["error"] = _error_text(exc)
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------------------------
# Sweep, checks, reports
# ----------------------------------------------------------------------------------------------------------


def run_sweep(
    variants: Sequence[Variant],
    *,
    kernel_module: str = DEFAULT_KERNEL_MODULE,
    jobs: int | None = None,
    fresh_cache: bool = False,
    align: bool = True,
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """Compile every variant in a spawned process pool; one row (dict over :data:`COLUMNS`) per variant, in
    the order of ``variants``, with the EX2 ratios filled in (:func:`add_ex2_ratios`).

    Workers drop ``TRITON_INTERPRET`` and ``PYTEST_VERSION`` from their environment. ``jobs``: pool size
    (default: CPU count). ``fresh_cache``: compile into an empty temporary Triton cache. ``align``: pass the
    JIT's divisibility hints (the kernel module's ``aot_attrs``, else
    :func:`_alignment_attrs`). ``progress``: called as ``(done, total, row)``.
    Raises ``ValueError`` for a bad ``jobs`` and ``FileNotFoundError`` when cuobjdump is missing; compile
    failures do not raise, they fill the row's ``error``.
    """
    if jobs is None:
        jobs = os.cpu_count() or 1
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs: expected a positive int, got {jobs!r}")
    cuobjdump = str(find_cuobjdump())
    env_set: dict[str, str] = {}
    tmp_cache = tempfile.TemporaryDirectory(prefix="naclip_inspect_cache_") if fresh_cache else None
    if tmp_cache is not None:
        env_set["TRITON_CACHE_DIR"] = tmp_cache.name
    rows: list[dict] = [v.base_row() for v in variants]
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=max(1, min(jobs, len(variants))),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(env_set, _STRIPPED_ENV),
        ) as pool:
            futures = {
                pool.submit(_compile_variant, v, kernel_module, cuobjdump, align): i
                for i, v in enumerate(variants)
            }
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                i = futures[fut]
                try:
                    rows[i] = fut.result()
                except Exception as exc:  # the worker died (killed for memory, broken pool)
                    rows[i]["error"] = _error_text(exc)
                if progress is not None:
                    progress(done, len(variants), rows[i])
    finally:
        if tmp_cache is not None:
            tmp_cache.cleanup()
    add_ex2_ratios(rows)
    return rows


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return round(a / b, 4)
    return float("inf") if a > 0 else 1.0


def add_ex2_ratios(rows: Sequence[dict]) -> None:
    """Set ``ex2_ratio`` = EX2(bias on) / EX2(bias off) on both rows of each pair (same target, dtype, head
    dim, q_is_k, config); ``None`` when a side failed or is missing.

    Also ``ex2_per_mma_ratio``: the same ratio of EX2 per tensor-core instruction. Static counts grow when the
    compiler duplicates a loop body (peeling, versioning); that scales EX2 and MMA counts alike, so this ratio
    stays ~1 then and rises only with extra exponentials per score element (diagnostic only)."""
    pairs: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        key = (r["target"], r["dtype"], r["head_dim"], r["q_is_k"], r["config"])
        pairs.setdefault(key, {})[int(r["bias"])] = r
    for pair in pairs.values():
        on, off = pair.get(1), pair.get(0)
        ratio = per_mma = None
        if on and off and on.get("ex2") is not None and off.get("ex2") is not None:
            ratio = _ratio(on["ex2"], off["ex2"])
            if on.get("tc_count") and off.get("tc_count"):
                per_mma = _ratio(on["ex2"] / on["tc_count"], off["ex2"] / off["tc_count"])
        for r in (on, off):
            if r is not None:
                r["ex2_ratio"] = ratio
                r["ex2_per_mma_ratio"] = per_mma


def _row_label(r: dict) -> str:
    return (
        f"{r['target']} {r['dtype']} D={r['head_dim']} bias={'on' if r['bias'] else 'off'} "
        f"q_is_k={r['q_is_k']} config#{r['config']}(BLOCK_M={r['BLOCK_M']} BLOCK_N={r['BLOCK_N']} "
        f"warps={r['num_warps']} stages={r['num_stages']})"
    )


def check_rows(rows: Sequence[dict], *, ex2_ratio_limit: float = EX2_RATIO_LIMIT) -> list[str]:
    """The CI criteria. Returns one ``"<variant>: <reason>"`` line per violation (empty list = pass):
    compile error; fp16/bf16 at D=64 with local-memory loads/stores or local bytes (spills); shared memory
    over ``smem_limit``; fp16/bf16 without the target's tensor-core op; ``ex2_ratio > ex2_ratio_limit``
    (reported on the bias-on row); driver register count != cuobjdump's."""
    failures: list[str] = []
    for r in rows:
        label = _row_label(r)
        if r.get("error"):
            failures.append(f"{label}: does not compile: {r['error']}")
            continue
        low_precision = r["dtype"] in ("fp16", "bf16")
        if (
            low_precision
            and r["head_dim"] == 64
            and ((r.get("lmem_ops") or 0) > 0 or (r["spill_bytes"] or 0) > 0)
        ):
            failures.append(
                f"{label}: spills for {r['dtype']} at D=64: {r['spill_bytes']} B/thread of local memory "
                f"(stack {r['stack_bytes']} B), {r.get('lmem_ops')} LDL/STL instructions, "
                f"{r['regs']} registers"
            )
        if r["smem_bytes"] is not None and r["smem_bytes"] > r["smem_limit"]:
            failures.append(
                f"{label}: shared memory {r['smem_bytes']} B (dynamic {r['smem_dynamic']} + static "
                f"{r['smem_static']}) exceeds the {r['target']} per-block limit {r['smem_limit']} B"
            )
        want = _TC_REQUIRED.get(int(str(r["target"]).removeprefix("sm_")))
        if low_precision and want and want not in str(r["tc_op"]).split("+"):
            failures.append(f"{label}: no {want} tensor-core instruction in the SASS (found: {r['tc_op']})")
        if r["bias"] and r.get("ex2_ratio") is not None and r["ex2_ratio"] > ex2_ratio_limit:
            per_mma = r.get("ex2_per_mma_ratio")
            why = (
                "EX2 per tensor-core op unchanged: duplicated code, not a per-element exp"
                if per_mma is not None and per_mma <= ex2_ratio_limit
                else f"EX2 per tensor-core op x{_fmt(per_mma)}: extra exponentials per score element"
            )
            failures.append(
                f"{label}: MUFU.EX2 with bias is {r['ex2_ratio']:.3f}x the count without bias (limit "
                f"{ex2_ratio_limit:.2f}; {r['ex2']} instructions; {why})"
            )
        if r.get("drv_regs") is not None and r["drv_regs"] != r["regs"]:
            failures.append(f"{label}: the driver reports {r['drv_regs']} registers, cuobjdump {r['regs']}")
    return failures


def _notes(rows: Sequence[dict]) -> list[str]:
    """Observations that are not failures (fp32/D=128 spills, driver local-memory disagreement)."""
    notes = []
    for r in rows:
        if r.get("error"):
            continue
        if not (r["dtype"] in ("fp16", "bf16") and r["head_dim"] == 64) and (r.get("lmem_ops") or 0) > 0:
            notes.append(
                f"{_row_label(r)}: {r['spill_bytes']} B/thread local memory, {r['lmem_ops']} LDL/STL "
                f"(not a check failure for {r['dtype']} D={r['head_dim']})"
            )
        if r.get("drv_spills") is not None and 4 * r["drv_spills"] != r["spill_bytes"]:
            notes.append(
                f"{_row_label(r)}: driver local memory {4 * r['drv_spills']} B/thread, cuobjdump "
                f"STACK+LOCAL {r['spill_bytes']} B"
            )
    return notes


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.3f}"
    return str(v)


_MD_COLUMNS = (
    ("dtype", "dtype"),
    ("head_dim", "D"),
    ("q_is_k", "q=k"),
    ("bias", "bias"),
    ("config", "cfg"),
    ("BLOCK_M", "BM"),
    ("BLOCK_N", "BN"),
    ("num_warps", "warps"),
    ("num_stages", "stages"),
    ("regs", "regs"),
    ("spill_bytes", "spill B"),
    ("lmem_ops", "LDL/STL"),
    ("smem_bytes", "smem B"),
    ("tc_op", "tensor op"),
    ("ex2", "EX2"),
    ("ex2_ratio", "EX2 bias/no-bias"),
    ("ex2_per_mma_ratio", "EX2/MMA bias/no-bias"),
)


def to_markdown(rows: Sequence[dict], meta: dict, failures: Sequence[str], notes: Sequence[str] = ()) -> str:
    """The report: usage block, run facts, check result, summary per (target, dtype, D), table per target."""
    buf = io.StringIO()
    w = buf.write
    w("# Static resource report of the fused attention kernel\n\n")
    w("```text\n" + USAGE_BLOCK + "```\n\n")
    sha = meta.get("git_sha") or "n/a (no commit)"
    dirty = " + uncommitted changes" if meta.get("git_dirty") else ""
    w(
        f"Generated {meta['generated']} by `{meta['command']}`: triton {meta['triton']}, "
        f"torch {meta['torch']}, git {sha}{dirty}, kernel module `{meta['kernel_module']}`. "
        f"{meta['n_variants']} variants in "
        f"{meta['sweep_s']:.0f} s wall ({meta['worker_cpu_s']:.0f} s CPU in the workers) on {meta['jobs']} "
        f"worker(s), {meta['cpu_count']} CPUs, {meta['cache']}; alignment hints "
        f"{'on (' + meta.get('align_hints_source', '') + ')' if meta['align_hints'] else 'off'}. "
        f"Configs: {meta['pruning']}"
        + (f" ({', '.join(meta['skipped'])})" if meta.get("skipped") else "")
        + ".\n\n"
    )
    limits = ", ".join(f"{t} {b} B" for t, b in meta["smem_limits"].items())
    w(
        "Columns: regs = registers/thread (`REG`); spill B = local memory bytes/thread (`STACK` + `LOCAL`); "
        "LDL/STL = local-memory loads/stores in the SASS (spill traffic); smem B = Triton's dynamic + static "
        "shared memory per block; tensor op = MMA instructions in the SASS (HMMA = mma.sync, HGMMA = wgmma); "
        "EX2 = static count of `MUFU.EX2`; EX2 bias/no-bias = that count with the bias over without, same "
        "config; EX2/MMA bias/no-bias = the same per tensor-core instruction (insensitive to duplicated loop "
        f"bodies). Shared-memory limits: {limits}.\n\n"
    )
    w(f"**Check: {'PASS' if not failures else f'FAIL ({len(failures)} problems)'}**\n\n")
    for f in failures:
        w(f"- {f}\n")
    if notes:
        w("\nNotes (not failures):\n\n" + "".join(f"- {n}\n" for n in notes))
    w("\n## Summary per target, dtype and head dim\n\n")
    w("| target (SASS) | dtype | D | variants | compiled | regs (min–max) | max spill B | max LDL/STL | ")
    w("max smem B | tensor op | EX2 ratio (max) |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|\n")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["dtype"], r["head_dim"]), []).append(r)
    for (tgt, dt, hd), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        arch = ",".join(sorted({r["arch"] for r in ok if r.get("arch")})) or "—"
        regs = [r["regs"] for r in ok if r.get("regs") is not None]
        ratios = [r["ex2_ratio"] for r in ok if r.get("ex2_ratio") is not None]
        cells = [
            f"{tgt} ({arch})",
            dt,
            str(hd),
            str(len(rs)),
            str(len(ok)),
            f"{min(regs)}–{max(regs)}" if regs else "—",
            _fmt(max((r["spill_bytes"] for r in ok), default=None)),
            _fmt(max((r["lmem_ops"] for r in ok), default=None)),
            _fmt(max((r["smem_bytes"] for r in ok), default=None)),
            ",".join(sorted({r["tc_op"] for r in ok})) or "—",
            _fmt(max(ratios) if ratios else None),
        ]
        w("| " + " | ".join(cells) + " |\n")
    for tgt in dict.fromkeys(r["target"] for r in rows):
        rs = [r for r in rows if r["target"] == tgt]
        arch = ",".join(sorted({r["arch"] for r in rs if r.get("arch")})) or "—"
        w(f"\n## {tgt} (SASS {arch}; shared memory limit {rs[0]['smem_limit']} B)\n\n")
        w("| " + " | ".join(h for _, h in _MD_COLUMNS) + " | error |\n")
        w("|" + "---|" * (len(_MD_COLUMNS) + 1) + "\n")
        for r in rs:
            cells = [("on" if r[k] else "off") if k == "bias" else _fmt(r.get(k)) for k, _ in _MD_COLUMNS]
            err = (r.get("error") or "").replace("|", "\\|")
            w("| " + " | ".join(cells) + f" | {err[:160]} |\n")
    return buf.getvalue()


def _to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _git_info() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
        if sha.returncode != 0:
            return None, None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha.stdout.strip(), (bool(dirty.stdout.strip()) if dirty.returncode == 0 else None)


def _version(name: str) -> str | None:
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{what}: expected at least one integer, got {text!r}")
    return vals


def _native_target() -> int:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--targets native needs a CUDA GPU, but torch.cuda.is_available() is False")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m naclip_kernels.inspect",
        description="Compile the fused attention kernel ahead of time (no GPU needed) and report registers, "
        "spills, shared memory, tensor-core instructions and MUFU.EX2 counts per variant.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=USAGE_BLOCK,
    )
    p.add_argument("--targets", default="80,90", help="compute capabilities (default 80,90) or 'native'")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="subset of fp16,bf16,fp32 (default: all)")
    p.add_argument("--head-dims", default="64,128", help="head dims (default 64,128)")
    p.add_argument("--q-is-k", default="1", help="1 = key-key (NACLIP's path), 0, or 0,1 (default 1)")
    p.add_argument("--configs", default=None, help="indices into CONFIGS, e.g. 0,5 (default: all)")
    p.add_argument(
        "--all-configs",
        action="store_true",
        help="also compile configs the kernel's config_allowed never launches for that dtype/head dim/bias "
        "(they are checked like the others)",
    )
    p.add_argument("--out", default="bench/results", help="output directory (default bench/results)")
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--check", action="store_true", help="exit 1 naming every failing variant and the reason")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--fresh-cache", action="store_true", help="compile into an empty Triton cache")
    p.add_argument(
        "--no-align-hints",
        action="store_true",
        help="compile without the JIT's divisibility-by-16 hints on pointer and stride arguments",
    )
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the Markdown")
    p.add_argument("--progress", action="store_true", help="one line per compiled variant on stderr")
    p.add_argument(
        "--kernel-module",
        default=DEFAULT_KERNEL_MODULE,
        help="module exposing CONFIGS, _attn_fwd_kernel and aot_signature (default %(default)s)",
    )
    args = p.parse_args(argv)
    try:
        args.targets = (
            [_native_target()] if args.targets.strip() == "native" else _int_list(args.targets, "--targets")
        )
        args.head_dims = _int_list(args.head_dims, "--head-dims")
        q_is_k = _int_list(args.q_is_k, "--q-is-k")
        if any(x not in (0, 1) for x in q_is_k):
            raise ValueError(f"--q-is-k: expected 0 and/or 1, got {args.q_is_k!r}")
        args.q_is_k = [bool(x) for x in q_is_k]
        args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        args.configs = None if args.configs is None else _int_list(args.configs, "--configs")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs: expected a positive integer, got {args.jobs}")
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point of ``python -m naclip_kernels.inspect``; returns the exit status (0 ok, 1 ``--check``
    failures, 2 usage error)."""
    args = _parse_args(argv)
    shown_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        configs = load_configs(args.kernel_module)  # reads CONFIGS only; compiles happen in clean workers
        keep = None if args.all_configs else autotune_keep(args.kernel_module)
        has_attrs = callable(getattr(importlib.import_module(args.kernel_module), "aot_attrs", None))
        every = build_variants(
            configs,
            targets=args.targets,
            dtypes=args.dtypes,
            head_dims=args.head_dims,
            q_is_k=args.q_is_k,
            config_indices=args.configs,
        )
        variants = build_variants(
            configs,
            targets=args.targets,
            dtypes=args.dtypes,
            head_dims=args.head_dims,
            q_is_k=args.q_is_k,
            config_indices=args.configs,
            keep=keep,
        )
        find_cuobjdump()
    except (ImportError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, row: dict) -> None:
        what = row["error"] or f"regs={row['regs']} spill={row['spill_bytes']} ex2={row['ex2']}"
        print(f"[{done}/{total}] {_row_label(row)}: {what}", file=sys.stderr, flush=True)

    jobs = args.jobs or os.cpu_count() or 1
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rows = run_sweep(
        variants,
        kernel_module=args.kernel_module,
        jobs=jobs,
        fresh_cache=args.fresh_cache,
        align=not args.no_align_hints,
        progress=progress if args.progress else None,
    )
    sweep_s = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    failures = check_rows(rows)
    notes = _notes(rows)
    sha, dirty = _git_info()
    meta = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python -m naclip_kernels.inspect", *shown_argv]),
        "triton": _version("triton"),
        "torch": _version("torch"),
        "python": platform.python_version(),
        "git_sha": sha,
        "git_dirty": dirty,
        "kernel_module": args.kernel_module,
        "configs": configs,
        "targets": args.targets,
        "dtypes": args.dtypes,
        "head_dims": args.head_dims,
        "n_variants": len(rows),
        "pruning": (
            "all configs compiled (--all-configs)"
            if args.all_configs
            else "no config_allowed in the kernel module: all configs compiled"
            if keep is None
            else "configs the kernel's config_allowed (its autotune pruning) drops for a dtype/head dim/bias "
            "flag (at large N) are skipped"
        ),
        "skipped": sorted(
            {
                f"{v.dtype} D={v.head_dim} bias={'on' if v.bias else 'off'} config#{v.config}"
                for v in set(every) - set(variants)
            },
        ),
        "n_failed_compiles": sum(1 for r in rows if r.get("error")),
        "sweep_s": round(sweep_s, 1),
        "worker_cpu_s": round(
            (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 1
        ),  # includes cuobjdump/ptxas
        "jobs": max(1, min(jobs, len(rows))),
        "cpu_count": os.cpu_count(),
        "cache": "fresh Triton cache" if args.fresh_cache else "default Triton cache",
        "align_hints": not args.no_align_hints,
        "align_hints_source": (
            "none" if args.no_align_hints else "aot_attrs" if has_attrs else "pointer/stride* names"
        ),
        "ex2_ratio_limit": EX2_RATIO_LIMIT,
        "smem_limits": {f"sm_{t}": SMEM_LIMITS[t] for t in args.targets},
    }
    report = {"meta": meta, "passed": not failures, "failures": failures, "notes": notes, "rows": rows}
    json_text = json.dumps(report, indent=1, default=str) + "\n"
    md = to_markdown(rows, meta, failures, notes)
    if not args.no_save:
        out = Path(args.out)
        _atomic_write(out / CSV_NAME, _to_csv(rows))
        _atomic_write(out / MD_NAME, md)
        _atomic_write(out / JSON_NAME, json_text)
    print(json_text if args.json else md, end="")
    if args.check and failures:
        print(f"naclip_kernels.inspect --check: {len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
