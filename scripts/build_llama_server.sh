#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the llama.cpp source vendored in the sdist of the
# llama-cpp-python version installed in .venv (same llama.cpp, same version) and installs it
# as .venv/bin/llama-server, the engine `appliance serve` runs each model in.
#
# Idempotent: skips when .venv/bin/llama-server exists and reports that llama-cpp-python
# version's llama.cpp build (a stamp file next to it records the version it was built for).
# Backend: CUDA when `nvcc` is on PATH, else the portable CPU build (no -march=native, no AMX:
# see setup.sh). APPLIANCE_LLAMA_BACKEND=cpu|cuda overrides. APPLIANCE_LLAMA_JOBS sets -j.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
DEST=.venv/bin/llama-server
STAMP=.venv/bin/llama-server.version
version=$("$PY" -c "import llama_cpp; print(llama_cpp.__version__)")
backend=${APPLIANCE_LLAMA_BACKEND:-}
gpu_seen() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
if [ -z "$backend" ]; then
    # nvcc alone is not enough: a CUDA toolkit without a GPU builds a binary nothing here runs.
    if command -v nvcc >/dev/null 2>&1 && gpu_seen; then backend=cuda; else backend=cpu; fi
fi
case "$backend" in cpu|cuda) ;; *) echo "APPLIANCE_LLAMA_BACKEND must be cpu or cuda, not '$backend'" >&2; exit 2 ;; esac
want="llama-cpp-python ${version} ${backend}"

if [ -x "$DEST" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && "$DEST" --version >/dev/null 2>&1; then
    echo "llama-server for ${want} already built"
    exit 0
fi

work=${APPLIANCE_LLAMA_SRC_DIR:-/tmp/appliance-llama-server}
src="$work/llama_cpp_python-${version}/vendor/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
    mkdir -p "$work"
    "$PY" -m pip download -q --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==${version}"
    tar -xzf "$work/llama_cpp_python-${version}.tar.gz" -C "$work"
fi

flags=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
       -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF)
build="$src/build-$backend"
if [ "$backend" = cuda ]; then
    # Every CUDA architecture the toolkit knows would take an hour; the local GPU's is enough,
    # and without one (a forced build for elsewhere) Ampere to Hopper (CMAKE_CUDA_ARCHITECTURES
    # overrides).
    if gpu_seen; then arch=native; else arch="80;86;89;90"; fi
    flags+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-$arch}")
fi
echo "building llama-server (${want}) in $build"
cmake -S "$src" -B "$build" "${flags[@]}" >"$work/cmake-$backend.log"
cmake --build "$build" --target llama-server -j "${APPLIANCE_LLAMA_JOBS:-$(nproc)}" >"$work/build-$backend.log"

install -m 0755 "$build/bin/llama-server" "$DEST"
echo "$want" >"$STAMP"
"$DEST" --version 2>&1 | head -n 2
