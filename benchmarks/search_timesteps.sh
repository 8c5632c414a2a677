#!/usr/bin/env bash
# Searches the time steps shipped in diffalign/models/schedules/ (resumable: a rerun skips the entries already
# searched and resumes an interrupted search).
# Usage: bash benchmarks/search_timesteps.sh [model] [minutes per search]
set -euo pipefail
model=${1:-builtin:fashion}
minutes=${2:-3}
out=diffalign/models/schedules/${model/:/_}
mkdir -p "$out"
for guidance in 1 7.5; do
  for sampler in unipc dpm-solver++; do
    for nfe in 5 8; do
      file="$out/${sampler}_g${guidance}.json"
      if python -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit(0 if any(e['nfe'] == int(sys.argv[2]) for e in d['entries']) else 1)" "$file" "$nfe" 2>/dev/null; then
        continue  # searched already (each entry records its method and time)
      fi
      diffalign calibrate timesteps --model "$model" --sampler "$sampler" --nfe "$nfe" --guidance "$guidance" \
        --minutes "$minutes" --method powell --seed 1 --num-noises 32 --quiet --out "$file"
    done
  done
done
