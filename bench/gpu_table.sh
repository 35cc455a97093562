#!/usr/bin/env bash
# gpu_table.py on the GPU machine (no network; open_clip, faiss and the scorer wheel absent there).
# Here, once: bash ../shared/gpu-check/prepare.sh   (fills .gpu/: wheels, corpora, MiniLM tokenizer files)
# Device:     carry [".gpu"], command `bash bench/gpu_table.sh [gpu_table.py args]`, e.g. --prompts 300000
# The table also lands in $OUT/gpu_table.txt.
set -u
PY=${PY:-python3}
G=/tmp/gpu-table
rm -rf "$G" && mkdir -p "$G"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; nproc
# dependency wheels prepared here; img2prompt itself from this working tree (the prepared wheel if that fails)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$G/site" \
  $(ls .gpu/whl/*.whl | grep -v '/img2prompt-') || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$G/proj" . 2>/dev/null \
  || $PY -m pip install -q --no-index --no-deps --no-compile --target "$G/proj" .gpu/whl/img2prompt-*.whl || exit 1
export PYTHONPATH="$G/proj:$G/site"
$PY bench/gpu_table.py --corpora .gpu/corpora --tokenizer-dir .gpu/minilm --workdir "$G/work" "$@" 2>&1 \
  | tee "${OUT:-.}/gpu_table.txt"
