#!/usr/bin/env bash
# The GPU benchmark at gemma-3-4b dimensions (random weights, bf16), one prepared call.
#
#   bash scripts/gpu_bench.sh            # from the repo root, on a machine with one CUDA GPU
#
# Times every stage at the gemma-3-4b preset's sizes (256 prompts x 256 new tokens at batch 256,
# eager and static-cache compiled; heal step 8 x 256 completion tokens with LoRA r=32 and the KL
# barrier; vignette eval 132 x 2 frames with T=128 think tokens, steered and healed), the naive
# references at reduced counts (batch-1 generation on 4 prompts x 64 tokens, one-row eval on 1
# row; extrapolated and labelled so), and an estimate of one preset round from the measured rates.
# Expected wall time on one H100: 5-7 minutes, of which ~2 minutes is the one-time compile.
# Writes $OUT/bench_gpu.json (rewritten after every stage), bench_gpu.log, env.txt.
# Needs torch (CUDA), transformers >= 5, peft, safetensors, pyyaml, tqdm; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/steerheal_gpu_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT=${BENCH_LIMIT_S:-500}   # stop before a 600 s call limit; the JSON holds every finished stage

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  "$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("transformers", "peft", "safetensors", "yaml", "tqdm", "papermill", "plotly"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
PY
} 2>&1 | tee "$OUT/env.txt"

timeout -k 10 "$LIMIT" "$PY" -m steerheal_utils bench --random-config gemma-3-4b --device cuda \
  --out "$OUT/bench_gpu.json" 2>&1 | grep -v -e "Warning" -e "warnings.warn" | tee "$OUT/bench_gpu.log"
rc=${PIPESTATUS[0]}
echo "bench exit code: $rc (124 = stopped at ${LIMIT}s; the JSON holds the stages that finished)"
# one decode step's sampling cost, transformers' warpers vs TopKTopP (CPU and this GPU), batch 256 x 262k vocab
timeout -k 10 120 "$PY" scripts/sampler_bench.py --reps 20 --devices cuda 2>&1 | tee "$OUT/sampler_bench.jsonl" || true
"$PY" - "$OUT/bench_gpu.json" <<'PY' || true
import json, sys
from steerheal_utils.tools.bench import format_table
r = json.load(open(sys.argv[1]))
print(format_table(r))
print("errors:", json.dumps(r.get("errors", {}), indent=1)[:2000])
print("round estimate:", json.dumps(r.get("round_estimate", {}), indent=1))
PY
exit "$rc"
