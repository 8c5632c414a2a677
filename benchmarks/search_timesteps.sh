#!/usr/bin/env bash
# Searches time steps for the shipped models (resumable: a rerun skips the entries already searched and resumes an
# interrupted search). The files land in benchmarks/results/timesteps_<model>/; copied to
# diffalign/models/schedules/<model>/ they become the samplers' defaults for that model (docs/samplers.md,
# "Searched time steps", says which are shipped and why).
# Usage: bash benchmarks/search_timesteps.sh [model] [minutes per search]
# The grid searched is set by SEARCH_GUIDANCES ("1 7.5"), SEARCH_SAMPLERS ("unipc dpm-solver++"), SEARCH_NFES
# ("5 8") and SEARCH_NOISES (32 noises, seed 1); SEARCH_OUT replaces the output directory. SEARCH_TELEPORT=1 searches
# the grids of teleported runs (the shipped Gaussian teleport over the first stretch) into <sampler>_g<g>_teleport.json.
set -euo pipefail
model=${1:-builtin:fashion}
minutes=${2:-3}
noises=${SEARCH_NOISES:-32}
out=${SEARCH_OUT:-benchmarks/results/timesteps_${model/:/_}}
mkdir -p "$out"
for guidance in ${SEARCH_GUIDANCES:-1 7.5}; do
  for sampler in ${SEARCH_SAMPLERS:-unipc dpm-solver++}; do
    for nfe in ${SEARCH_NFES:-5 8}; do
      teleport=() suffix=""
      if [ -n "${SEARCH_TELEPORT:-}" ]; then teleport=(--teleport) suffix="_teleport"; fi
      file="$out/${sampler}_g${guidance}${suffix}.json"
      if python -c "import json, sys; d = json.load(open(sys.argv[1])); sys.exit(0 if any(e['nfe'] == int(sys.argv[2]) for e in d['entries']) else 1)" "$file" "$nfe" 2>/dev/null; then
        continue  # searched already (each entry records its method and time)
      fi
      diffalign calibrate timesteps --model "$model" --sampler "$sampler" --nfe "$nfe" --guidance "$guidance" \
        --minutes "$minutes" --method powell --seed 1 --num-noises "$noises" --quiet "${teleport[@]}" --out "$file"
    done
  done
done
