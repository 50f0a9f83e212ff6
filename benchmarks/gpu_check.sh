#!/usr/bin/env bash
# The GPU checks of benchmarks/README.md in one run (each step under its own time limit: 12 minutes in all at most).
#
# Usage:
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: $OUT if set, else outputs/gpu_check
#
# 1. train_vs_reference.py --device cuda: our loop vs the reference Trainer, tiny model, same init, data and
#    audio per step (ours with the YAML's mixed_precision=auto: bf16 on a GPU that has it; the reference fp32,
#    the script's default);
# 2. train_step.py --attn both: the 600M model at the v100_16gb preset (fp16, gradient checkpointing) under a
#    16 GiB cap: audio-s/s, peak memory, MFU, eager vs SDPA;
# 3. inference_speed.py: W2v-BERT 2.0 vs whisper-large-v3 (random weights, fp16) at batch 1 and 8;
# 4. bakeoff_gpu.py: omniASR-CTC-300M's training step at the v100_16gb preset (audio-s/s, peak memory under the
#    16 GiB cap) and the zero-shot baselines' inference RTFx (omniASR-CTC 300M/1B, MMS-1b-all; the omniASR LLM
#    when LLM_CONFIG names its config.json), random weights in the released shapes.
# Each step writes <name>.txt (and train_vs_reference/inference_speed a .json) into OUT_DIR and has its own time
# limit, so one that hangs does not take the others with it. On a machine without a package index, put the missing
# Python packages (hydra-core, omegaconf, datasets, jiwer, soundfile, soxr, espeakng-loader; a transformers >= 5.23)
# as wheels in .whl/: they are installed first when that folder exists.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("transformers", "accelerate", "hydra", "omegaconf", "datasets", "jiwer", "soundfile", "soxr",
             "espeakng_loader", "numba"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "ok"))
    except Exception as e:  # report every missing package at once, then let the steps fail on their own
        print(name, "MISSING:", type(e).__name__, e)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT_DIR/environment.txt" 2>&1 || true

status=0
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt" | grep -v "it/s\]" | tail -25
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}

step train_vs_reference 300 "$PY" benchmarks/train_vs_reference.py --device cuda --steps 300 --repeats 2 \
    --threads 4 --work-dir /tmp/w2vbert_gpu_check --json "$OUT_DIR/train_vs_reference.json"
step train_step 120 "$PY" benchmarks/train_step.py --attn both --memory-cap-gib 16
step inference_speed 120 "$PY" benchmarks/inference_speed.py --device cuda --batch-sizes 1 8 --clips 64 \
    --json "$OUT_DIR/inference_speed.json"
step bakeoff_gpu 180 "$PY" benchmarks/bakeoff_gpu.py --device cuda --json "$OUT_DIR/bakeoff_gpu.json" \
    ${LLM_CONFIG:+--llm-config "$LLM_CONFIG"}
exit $status
