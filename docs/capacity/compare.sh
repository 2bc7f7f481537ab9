#!/bin/bash
# The adaptive-vs-fixed table of docs/capacity.md: every shipped trace shape over 24 hours
# and the business day over a week (seed 1, one request a minute at peak), for the
# Ubuntu-like and the Windows-like pool, each compared with `workerlease simulate compare`.
# Runs JOBS (default 2) comparisons at once. Writes var/capacity/<pool>-<trace>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=var/capacity
mkdir -p "$out"
runs=()
for pool in ubuntu windows; do
  for trace in steady:24 business-day:24 bursty:24 business-day:168; do
    shape=${trace%:*} hours=${trace#*:}
    name="$pool-$shape-${hours}h"
    .venv/bin/workerlease simulate generate --shape "$shape" --seed 1 --pool "$pool" \
      --rate 1 --hours "$hours" --out "$out/$name.csv" >/dev/null
    runs+=("$pool $name")
  done
done
compare() {
  local pool=$1 name=$2
  .venv/bin/workerlease simulate compare --config "docs/capacity/$pool.yaml" \
    --trace "$out/$name.csv" --pool "$pool" --json > "$out/$name.json.part"
  mv "$out/$name.json.part" "$out/$name.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(sys.argv[2], 'best fixed', r['best_fixed'], 'adaptive idle', format(-r['idle_saved'], '+.0%'), \
'in', r['elapsed_s'], 's')" "$out/$name.json" "$name"
}
export -f compare
export out
printf '%s\n' "${runs[@]}" | xargs -P "${JOBS:-2}" -L 1 bash -c 'compare "$@"' _
python3 docs/capacity/table.py "$out"
