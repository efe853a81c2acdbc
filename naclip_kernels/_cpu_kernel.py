"""The fused CPU backward (``csrc/gaussian_bwd_cpu.c``): compiled on first use, loaded with ctypes.

:func:`backward` returns ``dq, dk, dv`` (float32 ``[B, H, N, D]``, contiguous) and the per-head sums
``sum dS * G`` and ``sum dS * G * d^2`` (float64 ``[H]``) of one float32 CPU backward in a single pass over
the scores: the bias-parameter gradients cost no second pass, unlike aten's flash backward, which does not
expose ``dS``. Formulas and the measured effect: ``docs/autograd.md`` ("Fused CPU backward").

The C source is compiled once per source / compiler / CPU into ``$NACLIP_KERNELS_CACHE`` (default
``$XDG_CACHE_HOME/naclip_kernels``, i.e. ``~/.cache/naclip_kernels``) with ``$CC`` (default ``cc``), written
atomically, and checked against the float64 explicit path once per process. Its BLAS is the ``sgemm_``
torch itself links (MKL on x86-64 Linux wheels). When any of that is missing (no compiler, another BLAS, a
failed check), or ``NACLIP_CPU_KERNEL=0``, :func:`status` says why and the callers keep aten's path: slower,
same result.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checks import AttentionSpec

__all__ = ["BLOCK_M", "BLOCK_N", "ENV_CACHE", "ENV_SWITCH", "Status", "backward", "status"]

#: Query rows per block and (about) keys per block, whole grid rows: the two ``[BLOCK_M, ~BLOCK_N]`` float32
#: score tiles (512 KB) stay in a core's L2 cache, and each query block streams the key / value blocks and
#: their gradient accumulators once (measured side by side: docs/autograd.md, "Fused CPU backward").
BLOCK_M = 256
BLOCK_N = 256
ENV_SWITCH = "NACLIP_CPU_KERNEL"  # "0" / "off" / "false" / "no": never use the fused kernel
ENV_CACHE = "NACLIP_KERNELS_CACHE"
_SOURCE = Path(__file__).with_name("csrc") / "gaussian_bwd_cpu.c"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-std=gnu11")
_OFF = ("0", "off", "false", "no")


@dataclass(frozen=True)
class Status:
    """Whether the fused CPU backward is in use and, if not, why (``reason``); ``path``: the library."""

    available: bool
    reason: str
    path: str | None = None


class _Shape(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_int64) for n in ("B", "H", "N", "D", "P", "gh", "gw", "th", "block_m", "block_n")
    ]
    _fields_ += [("scale", ctypes.c_float)] + [(n, ctypes.c_void_p) for n in ("gyb", "gy", "gx", "gxd")]


class _Tens(ctypes.Structure):
    _fields_ = [
        ("p", ctypes.c_void_p),
        ("sb", ctypes.c_int64),
        ("sh", ctypes.c_int64),
        ("sn", ctypes.c_int64),
    ]


_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: tuple[Status, ctypes.CDLL | None, int] | None = None


def _cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "naclip_kernels"


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (``-march=native`` code is only valid on a CPU that has them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> tuple[str, str]:
    """``(path, version line)`` of ``$CC`` / ``cc``; RuntimeError when there is none."""
    cc = os.environ.get("CC", "").strip() or "cc"
    path = shutil.which(cc)
    if path is None:
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH (set $CC)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    return path, (out.stdout.splitlines() or [""])[0]


def _build(cc: str, version: str) -> Path:
    """The compiled library in the cache, compiled now with ``cc`` if absent (to a temporary file, then
    renamed); RuntimeError when compiling fails."""
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(_FLAGS).encode(), version.encode(), _cpu_fingerprint().encode()])
    )
    folder = _cache_dir()
    lib = folder / f"gaussian_bwd_cpu-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        res = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=300
        )
        if res.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _sgemm() -> int:
    """Address of the ``sgemm_`` (LP64 Fortran BLAS) inside torch; RuntimeError when torch has no MKL."""
    if not (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")):
        raise RuntimeError(f"only built for x86-64 Linux (this is {platform.system()} {platform.machine()})")
    if not torch.backends.mkl.is_available():
        raise RuntimeError("this torch build has no MKL (the fused kernel calls the sgemm_ torch links)")
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    try:
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value  # type: ignore[return-value]
    except AttributeError:
        raise RuntimeError("libtorch_cpu.so exports no sgemm_") from None


def _open() -> tuple[Status, ctypes.CDLL | None, int]:
    """Find sgemm_, build, load and check the library; unavailable with the reason on any failure (a
    RuntimeWarning when it should have worked: a failed build, load or self-check)."""
    try:
        gemm = _sgemm()
        cc, version = _compiler()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _log.info("fused CPU backward unavailable: %s", exc)
        return Status(False, str(exc)), None, 0
    try:
        path = _build(cc, version)
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return _warned(Status(False, str(exc))), None, 0
    fn = lib.naclip_gaussian_bwd_f32
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_Shape),
        ctypes.POINTER(_Tens),
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    fn.restype = ctypes.c_int
    err = _self_check(lib, gemm)
    if err is not None:
        return _warned(Status(False, err, str(path))), None, 0
    return Status(True, "compiled and checked", str(path)), lib, gemm


def _warned(st: Status) -> Status:
    warnings.warn(
        f"naclip_kernels: the fused CPU backward is off ({st.reason}); float32 CPU backward passes use "
        f"aten's slower path (same results). Set {ENV_SWITCH}=0 to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )
    return st


def _loaded() -> tuple[Status, ctypes.CDLL | None, int]:
    """The library, loaded once per process; ``$NACLIP_CPU_KERNEL`` is read at every call."""
    global _state
    if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
        return Status(False, f"disabled by ${ENV_SWITCH}"), None, 0
    if _state is None:
        with _lock:
            if _state is None:
                _state = _open()
    return _state


def status() -> Status:
    """Whether :func:`backward` can run here (compiles and checks the kernel on the first call)."""
    return _loaded()[0]


def _tables(spec: AttentionSpec, sigmas, scales):
    """``[th, gh, gh]`` ``bias_scale * gy`` and ``gy``, ``[th, gw, gw]`` ``gx`` and ``gx * dx^2`` (float32,
    the forward's factor tables: ``gy`` in float64 times bias_scale, rounded once)."""
    from .reference import gaussian_factors

    gh, gw = spec.grid_hw  # type: ignore[misc]
    dx = torch.arange(gw, dtype=torch.float32)
    dx2 = (dx[:, None] - dx[None, :]) ** 2
    rows = []
    for sg, bs in zip(sigmas, scales, strict=True):
        gy = gaussian_factors(gh, sg, dtype=torch.float64)
        gx = gaussian_factors(gw, sg, dtype=torch.float32)
        rows.append(((gy * bs).float(), gy.float(), gx, gx * dx2))
    return [torch.stack(t).contiguous() for t in zip(*rows, strict=True)]


def _call(lib, gemm, tensors, spec: AttentionSpec, sigmas, scales) -> torch.Tensor:
    """Run the kernel on unit-stride float32 ``q, k, v, out, dout``, ``lse`` and fresh ``dq, dk, dv``;
    returns the ``[B * H, 2]`` float64 sums."""
    biased = spec.has_bias and spec.grid_hw is not None
    tabs = _tables(spec, sigmas, scales) if biased else [torch.zeros(1)] * 4
    gh, gw = spec.grid_hw if biased else (0, 1)  # type: ignore[misc]
    shape = _Shape(
        spec.B, spec.H, spec.N, spec.D, spec.num_prefix_tokens, gh, gw, len(sigmas) if biased else 0,
        BLOCK_M, BLOCK_N, spec.scale, *(t.data_ptr() for t in tabs),
    )  # fmt: skip
    sums = torch.zeros(spec.B * spec.H, 2, dtype=torch.float64)
    io = (_Tens * 9)(*[_Tens(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in tensors])
    if lib.naclip_gaussian_bwd_f32(gemm, ctypes.byref(shape), io, sums.data_ptr(), torch.get_num_threads()):
        raise MemoryError("the fused CPU backward could not allocate its per-thread scratch")
    return sums


def exp(x: torch.Tensor) -> torch.Tensor:
    """The kernel's float32 ``exp`` of a CPU tensor (its accuracy test); needs :func:`status` available."""
    st, lib, _ = _loaded()
    if not st.available:
        raise RuntimeError(f"internal: the fused CPU backward is not available ({st.reason})")
    x = x.detach().to(torch.float32).contiguous()
    y = torch.empty_like(x)
    lib.naclip_exp_f32(
        ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(x.numel())
    )
    return y


def backward(dout, q, k, v, out, lse, spec: AttentionSpec, sigmas=(), scales=()):
    """``(dq, dk, dv, sum_g, sum_gd2)`` for float32 CPU tensors ``[B, H, N, D]`` with a unit-stride head dim
    (any other strides), ``lse`` ``[B, H, N]`` float32 from the forward, and the host sigma / bias_scale per
    bias head (``sigmas`` / ``scales``: length 1, or H for per-head values; empty without bias). The sums are
    per attention head, float64 ``[H]`` (zeros without bias). Call only when :func:`status` is available."""
    st, lib, gemm = _loaded()
    if not st.available:
        raise RuntimeError(f"internal: the fused CPU backward is not available ({st.reason})")
    grads = [torch.empty(spec.B, spec.H, spec.N, spec.D, dtype=torch.float32) for _ in range(3)]
    sums = _call(lib, gemm, [q, k, v, out, dout, lse.unsqueeze(-1), *grads], spec, sigmas, scales)
    s = sums.view(spec.B, spec.H, 2).sum(0)
    return (*grads, s[:, 0], s[:, 1])


def _self_check(lib, gemm) -> str | None:
    """Compare one small per-head-sigma case (2 x 3 grid, a prefix token, 3 heads) with the explicit path in
    float64 (:func:`naclip_kernels.torch_backward.explicit_backward`: plain tensor ops, no autograd, since
    this may run inside a backward pass); the failure message, or None."""
    from .torch_backend import bias_params
    from .torch_backward import _finish_bias, explicit_backward, explicit_forward

    g = torch.Generator().manual_seed(0)
    B, H, N, D, grid, sig = 2, 3, 7, 20, (2, 3), (0.7, 1.5, 3.0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(4))
    sigma = torch.tensor(sig, dtype=torch.float64)
    spec = AttentionSpec(B, H, N, D, grid, sigma, D**-0.5, 1, 1.0, torch.float64, torch.device("cpu"))
    o, lse = explicit_forward(q, k, v, spec)
    dq, dk, dv, (dsig, _) = explicit_backward(do, q, k, v, o, lse, spec, need_sigma=True, need_bias=False)
    spec32 = dataclasses.replace(spec, sigma=sigma.float(), dtype=torch.float32)
    grads = [torch.empty(B, H, N, D) for _ in range(3)]
    f32 = [t.float() for t in (q, k, v, o, do, lse.unsqueeze(-1))]
    sums = _call(lib, gemm, [*f32, *grads], spec32, sig, (1.0,) * 3)
    got_sig, _ = _finish_bias(bias_params(spec32), sums.view(B, H, 2).sum(0)[:, 1], None, H)
    for name, a, b in zip(("dq", "dk", "dv", "dsigma"), [*grads, got_sig], [dq, dk, dv, dsig], strict=True):
        err = float((a.double() - b).abs().max() / b.abs().max())
        if not err <= 1e-5:
            return f"self-check failed: {name} differs from the float64 explicit path by {err:.3g} (relative)"
    return None
