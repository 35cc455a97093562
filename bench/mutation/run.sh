#!/usr/bin/env bash
# Mutation pass over one module (issue 35): bench/mutation/run.sh NAME  (config: bench/mutation/NAME.toml).
# Run from the repo root with the dev venv's bin first on PATH (cosmic-ray 8.7.0 installed there).
# cosmic-ray mutates the file IN PLACE (it fits the editable, package-dir install) and restores it after
# each mutant; this script checks that the source is clean afterwards. Results: bench/mutation/out/NAME.*
set -euo pipefail
name=$1
cfg=bench/mutation/$name.toml
out=bench/mutation/out
mkdir -p "$out"
db=$out/$name.sqlite
rm -f "$db"
start=$(date +%s)
cosmic-ray init "$cfg" "$db"
cr-filter-operators "$db" "$cfg"
if grep -q 'filters.line-filter' "$cfg"; then cr-filter-lines "$db" --config "$cfg"; fi
cosmic-ray baseline "$cfg"
cosmic-ray exec "$cfg" "$db"
end=$(date +%s)
cr-report --show-pending "$db" > "$out/$name.report.txt" || true
echo "wall: $((end - start)) s" >> "$out/$name.report.txt"
tail -4 "$out/$name.report.txt"
module=$(sed -n 's/^module-path *= *"\(.*\)"/\1/p' "$cfg")
git diff --exit-code -- "$module" >/dev/null || { echo "SOURCE LEFT MUTATED: $module" >&2; exit 3; }
