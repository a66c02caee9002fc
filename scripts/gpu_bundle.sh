#!/usr/bin/env bash
# Packs what `k4serve serve` needs on a GPU host whose image has torch but not the serving wheels, and has no
# network (this workplace's lent H200s): .whl/site.tar.xz (nvidia-pytriton with only the CPython 3.12 stub,
# tritonclient, numpy 1.26, imageio-ffmpeg, python-rapidjson, ml_dtypes) and .whl/gpu_serve.sh, to source there:
#   source .whl/gpu_serve.sh && python -m k4serve.cli serve --preset flash-512 --models t2v ...
# The bundle stays under 64 MiB (the device tool's carry limit). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}  # absolute: used from other folders below
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux2010_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$work/wheels" nvidia-pytriton==0.7.0 tritonclient==2.73.0 numpy==1.26.4 python-rapidjson==1.25 \
  imageio-ffmpeg==0.6.0 ml_dtypes==0.5.1
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do (cd "$work/site" && "$PY" -m zipfile -e "$wheel" .); done
site=$work/site
chmod +x "$site"/pytriton/tritonserver/bin/tritonserver "$site"/imageio_ffmpeg/binaries/ffmpeg-*
# Only the 3.12 stub (and not the 3.13 stub's libpython), no numpy tests: what keeps the bundle under the limit.
find "$site"/pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
chmod +x "$site"/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub
rm -rf "$site"/nvidia_pytriton.libs/libpython3-*.13.so* "$site"/numpy/tests "$site"/numpy/*/tests
tar -cf - -C "$work" site | xz -T0 -6 > .whl/site.tar.xz
cat > .whl/gpu_serve.sh <<'EOF'
# Sourced on the GPU host: a venv over the image's packages with the bundle first on the path (numpy 1.26: the
# 24.10 stub needs numpy < 2), scipy/sklearn hidden (the image's builds need numpy 2), this repository importable.
set -e
python3 -m venv --without-pip /tmp/venv
SITE=$(/tmp/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar -xJf .whl/site.tar.xz -C "$SITE" --strip-components=1
IMAGE_SITE=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
printf '%s\n%s\n' "$PWD" "$IMAGE_SITE" > "$SITE/zz_image.pth"
echo 'import sys; sys.modules.update(scipy=None, sklearn=None)' > "$SITE/00_hide.pth"
export PATH=/tmp/venv/bin:$PATH NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python -c 'import numpy, torch, k4serve, tritonclient.grpc; print("serving venv:", numpy.__version__, torch.__version__)'
set +e
EOF
ls -l .whl/site.tar.xz .whl/gpu_serve.sh
