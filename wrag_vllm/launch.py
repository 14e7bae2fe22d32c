"""Start and stop a `vllm serve` with WRAG as a child process (the demo, benchmarks and tests use it).

The server runs in its own process group so that stop() ends vLLM's API server, engine core and
workers together. Output goes to a log file; tail() shows its end when start-up fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    return str(Path(sys.executable).with_name("vllm"))


class VllmServer:
    """`vllm serve MODEL` on 127.0.0.1 with the WRAG plugins allow-listed.

    wrag: the {"wrag": {...}} section of --additional-config (None: WRAG off, a plain vLLM server).
    """

    def __init__(self, model_dir, work_dir, wrag: dict | None = None, api_key: str | None = None,
                 eager: bool = True, extra_args=(), env: dict | None = None, port: int | None = None,
                 kv_cache_bytes: int = 256 << 20, served_name: str | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / "vllm-server.log"
        cmd = [vllm_executable(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
               "--kv-cache-memory-bytes", str(kv_cache_bytes)]
        if served_name:
            cmd += ["--served-model-name", served_name]
        if wrag is not None:
            cmd += ["--additional-config", json.dumps({"wrag": wrag})]
        if api_key:
            cmd += ["--api-key", api_key]
        if eager:
            cmd.append("--enforce-eager")
        cmd += list(extra_args)
        e = dict(os.environ)
        e.setdefault("VLLM_CACHE_ROOT", str(work_dir / "vllm-cache"))
        e.update({"VLLM_CPU_KVCACHE_SPACE": e.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1",
                  "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if wrag is not None:
            plugins = [p for p in e.get("VLLM_PLUGINS", "").split(",") if p]
            e["VLLM_PLUGINS"] = ",".join(plugins + ["wrag"] * ("wrag" not in plugins))
        else:
            e["WRAG_ENABLED"] = "0"
        for k, v in (env or {}).items():  # None removes a variable
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        self.cmd = cmd
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True, cwd=str(work_dir))

    def wait_ready(self, timeout: float = 600.0, progress=None) -> float:
        """Poll /health; returns seconds taken. progress(seconds) is called every ~10 s."""
        t0 = last = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            if progress and time.time() - last >= 10:
                last = time.time()
                progress(last - t0)
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
