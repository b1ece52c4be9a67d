#!/usr/bin/env bash
# MFU of packed training on one GPU (issue 4, section 5): a SigLIP-B/16-224-sized encoder and a
# Llama-style LLM of about 1B parameters (Llama-3.2-1B's shapes: width 2048, 16 layers, 32 query
# and 8 key/value heads, MLP 8192; the world's small vocabulary), random weights, bf16 autocast,
# fused AdamW, every part trained, batches packed and collated before the timing.
#
#   OUT=runs/gpu-mfu bash bench/gpu_packed_mfu.sh
#
# Three runs on one preparation (same weights, same samples, same order): the varlen kernel,
# the varlen kernel with torch.compile per block, and SDPA with the block-diagonal mask; and on
# request (RUNS="auto-compiled ...") the default setting, attn_implementation auto, compiled,
# which should reach the same kernel. Each writes OUT/<name>.json (the benchmark's last line)
# and OUT/<name>.log. GRAD_ACCUM=A steps the optimizer after every A-th batch (WARMUP and STEPS
# count batches and must be multiples of A), as a run with a realistic global batch does.
set -u
OUT=${OUT:-runs/gpu-mfu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export TORCH_LOGS=${TORCH_LOGS:-recompiles}  # name every recompilation (and its reason) in the logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY - <<'PYEOF' | tee -a "$OUT/gpu.txt"
import inspect, torch, transformers
try:
    from torch.nn.attention.varlen import varlen_attn
    sig = str(inspect.signature(varlen_attn))
except ImportError as e:
    sig = f"missing: {e}"
print(f"torch {torch.__version__} transformers {transformers.__version__} varlen_attn{sig}")
PYEOF
COMMON=(--device cuda --work "${WORK:-/tmp/gpu-mfu}" --vision-type siglip --image-size 224 --vision-patch 16
        --vision-hidden 768 --vision-layers 12 --llm-hidden 2048 --llm-layers 16 --llm-heads 32 --llm-kv-heads 8
        --llm-intermediate 8192 --max-len 1024 --pack-tokens 4096 --batch "${BATCH:-48}" --warmup "${WARMUP:-4}"
        --steps "${STEPS:-12}" --grad-accum "${GRAD_ACCUM:-1}" --world-train 400 --threads 16 --variants vlmkit-packed --skip-alone --reuse-prepared)
run() {  # name, seconds, extra options
    local name=$1 secs=$2; shift 2
    echo "== $name"
    timeout "$secs" "$PY" bench/train_throughput.py "${COMMON[@]}" "$@" --json-out "$OUT/$name.json" \
        > "$OUT/$name.log" 2>&1
    echo "exit $?"
    grep '^{' "$OUT/$name.log" | tail -2 | cut -c1-1500
    grep -v '^{' "$OUT/$name.log" | grep -iE "error|Traceback|out of memory" | tail -5
    echo "recompilations: $(grep -c 'Recompiling function' "$OUT/$name.log")"
    grep -A3 'Recompiling function' "$OUT/$name.log" | grep -i 'triggered by\|guard' | sort | uniq -c | head -8
}
RUNS=${RUNS:-varlen varlen-compiled sdpa}
for name in $RUNS; do
    case $name in
        varlen) run varlen "${T1:-240}" --attn varlen ;;
        varlen-compiled) run varlen-compiled "${T2:-200}" --attn varlen --compile ;;
        auto-compiled) run auto-compiled "${T2:-200}" --attn auto --compile ;;  # the default setting
        sdpa) run sdpa "${T3:-100}" --attn sdpa ;;
    esac
done
