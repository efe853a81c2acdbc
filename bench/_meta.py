"""Helpers shared by the benchmark scripts: machine/version/git metadata, Linux ``/proc`` memory probes and
the fresh-process worker runner (:func:`run_worker`).

Metadata builds on :func:`naclip.eval.report.environment_info` (versions, git sha and dirty flag: the one
place that collects them) and adds what a timing needs: host, CPU model and count, memory, load, threads.
Result files are written with :func:`naclip.io.atomic_write` (see :func:`write_text`).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["cpu_model", "machine_info", "malloc_trim", "reset_peak_rss", "status_kb", "write_text"]


def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmSize`` ...); OSError if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0); False if not
    possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so an RSS baseline is not inflated by earlier frees."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cpu_model() -> str:
    """``model name`` from ``/proc/cpuinfo``, else ``platform.processor()``, else ``"unknown"``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str | None = None, *, threads: int | None = None) -> dict:
    """Metadata of a benchmark run: ``timestamp`` (UTC), ``host``, ``cpu_model``, ``cpu_count``,
    ``cpu_affinity``, ``mem_total_gb``, ``loadavg_at_start``, ``device``, ``torch_threads``, ``versions``
    (python, naclip, torch, open_clip, numpy, pillow, triton, cuda, platform, device_name), ``git_sha`` and
    ``git_dirty`` (both None when git is unavailable or fails), ``cpu_backward_kernel`` (``"fused"``, or
    ``"aten (why)"``: which float32 CPU backward ran, :mod:`naclip_kernels._cpu_kernel`)."""
    import torch

    from naclip.eval.report import environment_info

    env = environment_info(device)
    versions = dict(env["versions"])
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - informational only
        versions["triton"] = f"unavailable ({type(e).__name__})"
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        mem_gb = None
    from naclip_kernels import _cpu_kernel

    cpu_kernel = _cpu_kernel.status()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gb": mem_gb,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "versions": versions,
        "git_sha": env["git_sha"],
        "git_dirty": env["git_dirty"],
        "cpu_backward_kernel": "fused" if cpu_kernel.available else f"aten ({cpu_kernel.reason})",
    }


def write_text(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write ``text`` (UTF-8) or bytes to ``path`` atomically through :func:`naclip.io.atomic_write`."""
    from naclip.io import atomic_write

    data = text.encode("utf-8") if isinstance(text, str) else text
    return atomic_write(path, lambda f: f.write(data))


def run_worker(args: list[str], *, threads: int, timeout: float) -> dict:
    """Run ``python <args>`` in a fresh process from the repository root (``OMP_NUM_THREADS=threads``,
    ``OPENBLAS_NUM_THREADS=1``) and return the JSON of its ``RESULT `` line, or ``{"status": why}`` when it
    timed out or printed none (the last line of its output, exit code)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=root
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": f"failed (exit {r.returncode}): {tail[0][:300]}"}
