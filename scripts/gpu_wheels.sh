#!/usr/bin/env bash
# The wheels of the `gpu` extra (FlashAttention-4's CuTe DSL kernels, the cuDNN frontend) for an offline GPU host
# whose image already has torch 2.11 cu130, triton, cuda-bindings, einops, protobuf (this workplace's lent H200s).
#
#   scripts/gpu_wheels.sh download   (here, with PyPI)  -> .whl/gpu-a/ and .whl/gpu-b/, each under 60 MiB
#   scripts/gpu_wheels.sh install    (there)            -> /tmp/k4serve-gpu/site, then: source /tmp/k4serve-gpu/env.sh
#
# The device tool carries at most 64 MiB per call, and nvidia-cutlass-dsl-libs-cu13 alone is 88 MiB (its MLIR
# library is already stripped; xz -9 only brings it to 61 MiB), so that wheel travels in 40 MiB parts over two calls
# to the same warm machine: the first carries .whl/gpu-a (ignored files stay on the machine between calls), the
# second carries .whl/gpu-b and runs `install`, which joins the parts and checks every sha256 before installing.
set -euo pipefail
cd "$(dirname "$0")/.."

CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
PINS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 nvidia-cudnn-frontend==1.32.0
      quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
# what goes with the first 40 MiB part; the rest (and the SHA256SUMS the install checks) go with the other parts
FIRST_CALL=(nvidia_cudnn_frontend-1.32.0-*.whl)
PREFIX=/tmp/k4serve-gpu

download() {
  local py=${PYTHON:-$PWD/.venv/bin/python}
  local exclude
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  local platforms=()
  for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
      manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$work" "${PINS[@]}"
  rm -rf .whl/gpu-a .whl/gpu-b
  mkdir -p .whl/gpu-a .whl/gpu-b
  (cd "$work" && sha256sum -- *.whl > SHA256SUMS)
  split -b 40M -d -a 2 "$work/$CU13" ".whl/gpu-a/$CU13.part"
  mv .whl/gpu-a/"$CU13".part0[1-9] .whl/gpu-b/
  rm "$work/$CU13"
  for pattern in "${FIRST_CALL[@]}"; do mv "$work"/$pattern .whl/gpu-a/; done
  mv "$work"/*.whl "$work/SHA256SUMS" .whl/gpu-b/
  (cd .whl && sha256sum -- gpu-a/*.part* gpu-b/*.part* >> gpu-b/SHA256SUMS)
  for dir in .whl/gpu-a .whl/gpu-b; do
    local mib=$(( $(du -sb "$dir" | cut -f1) / 1048576 ))
    (( mib < 60 )) || { echo "$dir is $mib MiB: over the 64 MiB carry limit with the repository" >&2; exit 1; }
    echo "$dir: $mib MiB"
    ls -l "$dir" | tail -n +2
  done
}

install() {
  if ! ls .whl/gpu-a/"$CU13".part00 >/dev/null 2>&1; then
    echo "gpu_wheels: .whl/gpu-a is not on this machine: carry .whl/gpu-a in one call, then .whl/gpu-b in the next" \
         "call to the same warm machine (a released machine starts bare)" >&2
    exit 1
  fi
  local wheels=$PREFIX/wheels
  rm -rf "$PREFIX" && mkdir -p "$wheels"
  (cd .whl && grep '\.part' gpu-b/SHA256SUMS | sha256sum -c --quiet)
  cat .whl/gpu-a/"$CU13".part* .whl/gpu-b/"$CU13".part* > "$wheels/$CU13"
  cp .whl/gpu-a/*.whl .whl/gpu-b/*.whl "$wheels/"
  (cd "$wheels" && grep -v '\.part' "$OLDPWD/.whl/gpu-b/SHA256SUMS" | sha256sum -c --quiet)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PREFIX/site" \
    "$wheels"/*.whl
  rm -rf "$wheels"
  # --target skips the .pth that puts the CuTe DSL's `cutlass` package on the path: name its folder instead
  cat > "$PREFIX/env.sh" <<EOF
export PYTHONPATH=$PREFIX/site:$PREFIX/site/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}
EOF
  # shellcheck disable=SC1091
  source "$PREFIX/env.sh"
  # report each library (a failing import is printed, not fatal: the other backends still run)
  python3 - <<'PY'
import importlib
for module in ("flash_attn.cute", "cudnn"):
    try:
        importlib.import_module(module)
        print(f"gpu wheels: {module} imports")
    except Exception as error:
        print(f"gpu wheels: {module} FAILED to import: {type(error).__name__}: {error}")
PY
}

case "${1:-}" in
  download) download ;;
  install) install ;;
  *) echo "usage: scripts/gpu_wheels.sh download|install" >&2; exit 2 ;;
esac
