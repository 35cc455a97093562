#!/usr/bin/env bash
# The GPU check in one command (issue 34 item 3): bench/gpu_table.py's parts (a)–(e), one table, < 8 minutes.
# Here, once:  bash bench/gpu_prepare.sh        (fills the git-ignored .gpu/: wheels, corpora, images, MiniLM tokenizer)
# Device:      run with carry [".gpu"], timeout_s 540, command `bash bench/gpu_table.sh [gpu_table.py args]`
# The table is printed and written to $OUT/gpu_table.txt; part logs to $OUT/gpu_logs/.
# Wheels are installed only for what the interpreter lacks (the GPU machine has torch, transformers,
# sentence-transformers; not open_clip, faiss, fastapi/uvicorn); img2prompt itself from this working tree.
set -u
PY=${PY:-python3}
G=/tmp/gpu-table
rm -rf "$G" && mkdir -p "$G"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; echo "cpus: $(nproc)"
paths=""
if ! $PY -c "import open_clip, faiss, ftfy" 2>/dev/null; then
  [ -d .gpu/whl ] || { echo "open_clip/faiss missing and no .gpu/whl: run bash bench/gpu_prepare.sh here first"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$G/site" \
    $(ls .gpu/whl/*.whl | grep -v '/img2prompt-') || exit 1
  paths="$G/site"
fi
if ! $PY -c "import img2prompt" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$G/proj" . 2>/dev/null \
    || $PY -m pip install -q --no-index --no-deps --no-compile --target "$G/proj" .gpu/whl/img2prompt-*.whl || exit 1
  paths="$G/proj${paths:+:$paths}"
fi
if ! PYTHONPATH="$paths" $PY -c "import fastapi, uvicorn, python_multipart, httpx, pydantic" 2>/dev/null; then
  # the serve extra and the load clients, resolved from the prepared wheels only (their own folder, last)
  $PY -m pip install -q --no-index --find-links .gpu/whl-serve --no-compile --no-cache-dir --target "$G/serve" \
    fastapi uvicorn python-multipart httpx pydantic || echo "serve wheels not installed: the serve part will fail"
  paths="${paths:+$paths:}$G/serve"
fi
export PYTHONPATH="$paths${PYTHONPATH:+:$PYTHONPATH}"
echo "set-up $(( $(date +%s) - T0 )) s; PYTHONPATH=$PYTHONPATH"
args=()
[ -d .gpu/corpora ] && args+=(--corpora .gpu/corpora)
[ -d .gpu/minilm ] && args+=(--tokenizer-dir .gpu/minilm)
[ -d .gpu/images ] && args+=(--images-dir .gpu/images)
# 420 s for the parts (their caps shrink to fit) + this set-up (< 30 s) stay under 8 minutes; a hard stop at 450 s
timeout -k 10 450 $PY bench/gpu_table.py "${args[@]}" --workdir "$G/work" "$@"
echo "exit $? after $(( $(date +%s) - T0 )) s"
