"""The native CPU op (kernels/csrc/delta_cpu.cpp), built for this host on first use.

torch.utils.cpp_extension compiles it with -O3 -march=native and OpenMP into a build folder keyed
by the source, torch's version and the CPU's flags (~/.cache/wrag_kernels/, or
$WRAG_KERNELS_CACHE), so a second process, or a second run, loads it in milliseconds. Loading it
registers the CPU kernel of torch.ops.wrag.apply_delta_native (defined in ops.py). Where no
compiler works, `load()` returns None after one warning and the torch path (cpu.py) serves.
WRAG_NATIVE_PAR_MIN_ELEMS (default 65536): calls reading fewer factor elements run on one thread.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "delta_cpu.cpp"
_STATE: dict = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo on Linux; the processor name elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {platform.processor()}


def build_dir() -> Path:
    flags = " ".join(sorted(cpu_flags())).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + flags).hexdigest()[:16]
    root = Path(os.environ.get("WRAG_KERNELS_CACHE") or Path.home() / ".cache" / "wrag_kernels")
    d = root / f"delta_cpu-{key}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load():
    """The loaded extension (loading it registers apply_delta_native's CPU kernel), or None where it
    cannot be built (warned once)."""
    if "mod" not in _STATE:
        try:
            from torch.utils.cpp_extension import load as load_ext
            _STATE["mod"] = load_ext(name="wrag_delta_cpu", sources=[str(SOURCE)], build_directory=str(build_dir()),
                                     extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 - no compiler / headers: the torch path serves
            _STATE["mod"] = None
            warnings.warn(f"wrag_kernels: the native CPU op could not be built ({type(e).__name__}: "
                          f"{str(e)[:300]}); the slower torch path serves", RuntimeWarning, stacklevel=2)
    return _STATE["mod"]
