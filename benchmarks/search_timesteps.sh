#!/usr/bin/env bash
# Searches time steps for the shipped models (resumable: a rerun skips the entries already searched and resumes an
# interrupted search). The files land in benchmarks/results/timesteps_<model>/; copied to
# diffalign/models/schedules/<model>/ they become the samplers' defaults for that model (none are shipped: see
# docs/samplers.md#searched-time-steps for why).
# Usage: bash benchmarks/search_timesteps.sh [model] [minutes per search]
set -euo pipefail
model=${1:-builtin:fashion}
minutes=${2:-3}
out=benchmarks/results/timesteps_${model/:/_}
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
