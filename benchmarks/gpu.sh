#!/usr/bin/env bash
# The GPU measurements, in one run: run from the repository root on a CUDA machine with diffalign installed.
#
#     bash benchmarks/gpu.sh [results-dir]        # default: gpu-results
#
# 1. benchmarks/pipeline_speed.py: each sampler in a Stable-Diffusion-1.5-sized pipeline (random weights), float32
#    and bf16: seconds per call, agreement with diffusers' scheduler for the same method, finite outputs.
# 2. benchmarks/align_memory.py: GPU memory of LoRA D3PO training on that pipeline, adapter-disabled reference
#    against a deepcopy, float32 and bf16 autocast.
# 3. Every alignment method trains a few steps on builtin:fashion on the GPU under bf16 autocast (methods.jsonl:
#    each run's last metrics row).
set -u
out=${1:-gpu-results}
mkdir -p "$out"
log="$out/log.txt"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$log" 2>&1
python3 -c "import torch, diffusers, peft, accelerate; print(torch.__version__, diffusers.__version__, peft.__version__, accelerate.__version__)" >>"$log" 2>&1

timeout 150 python3 benchmarks/pipeline_speed.py --model sd15-sized --dtypes fp32,bf16 --repeats 3 \
    --json "$out/pipeline_speed.json" >>"$log" 2>&1 || echo "pipeline_speed: exit $?" >>"$log"
timeout 180 python3 benchmarks/align_memory.py --models sd15-sized --mixed-precision no,bf16 --max-steps 2 \
    --pairs-per-step 2 --num-steps 10 --steps-per-backward 1 --json "$out/align_memory.json" >>"$log" 2>&1 \
    || echo "align_memory: exit $?" >>"$log"

tmp=$(mktemp -d)
common=(--model builtin:fashion --reward jpeg_compressibility --max-steps 5 --quiet --set mixed_precision=bf16)
timeout 40 diffalign data synth --model builtin:fashion --rewards jpeg_compressibility,contrast --num-prompts 16 \
    --k 4 --out "$tmp/syn" --quiet >>"$log" 2>&1 || echo "data synth: exit $?" >>"$log"
for method in d3po diffusion-dpo rankdpo smpo distill-dpo; do
    data=()
    case $method in rankdpo|smpo) data=(--data "$tmp/syn");; esac
    timeout 45 diffalign train "$method" "${common[@]}" "${data[@]}" --out "$tmp/$method" >>"$log" 2>&1 \
        || echo "$method: exit $?" >>"$log"
    python3 - "$method" "$tmp/$method/metrics.jsonl" >>"$out/methods.jsonl" 2>>"$log" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[2])]
print(json.dumps({"method": sys.argv[1], "s_per_step": rows[-1]["wall_s"] / rows[-1]["step"], **rows[-1]}))
EOF
done
grep -v "^\[transformers" "$log" | grep -v "should be kept in float32"
