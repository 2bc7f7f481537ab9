#!/bin/bash
# The adaptive-vs-fixed table of docs/capacity.md: four 24-hour traces (seed 1, one
# request a minute at peak), each compared with `workerlease simulate compare`.
# About 5-15 minutes per trace on 2 shared cores. Writes var/capacity/<pool>-<shape>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=var/capacity
mkdir -p "$out"
for pool in ubuntu windows; do
  for shape in business-day bursty; do
    .venv/bin/workerlease simulate generate --shape "$shape" --seed 1 --pool "$pool" \
      --rate 1 --hours 24 --out "$out/$pool-$shape.csv"
    .venv/bin/workerlease simulate compare --config "docs/capacity/$pool.yaml" \
      --trace "$out/$pool-$shape.csv" --pool "$pool" --json > "$out/$pool-$shape.json"
    echo "$pool $shape: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); \
print('best fixed', r['best_fixed'], 'adaptive idle', format(-r['idle_saved'], '+.0%'))" \
      "$out/$pool-$shape.json")"
  done
done
