#!/usr/bin/env bash
# GPU smoke test for the serving engine: builds llama-server with CUDA (into its own path, the
# CPU build stays), loads the default model (gemma3-270m) with every layer offloaded, generates,
# and prints tokens/s and the offloaded layers. A few minutes on a GPU machine; record the
# figures in bench/README.md. Needs nvcc and an NVIDIA GPU; exits 2 without them.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvcc >/dev/null || { echo "gpu_check: nvcc is not on PATH (install the CUDA toolkit)" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader

PY=.venv/bin/python
version=$("$PY" -c "import llama_cpp; print(llama_cpp.__version__)")
work=${APPLIANCE_LLAMA_SRC_DIR:-/tmp/appliance-llama-server}
src="$work/llama_cpp_python-${version}/vendor/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
    mkdir -p "$work"
    "$PY" -m pip download -q --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==${version}"
    tar -xzf "$work/llama_cpp_python-${version}.tar.gz" -C "$work"
fi
build="$src/build-cuda"
if [ ! -x "$build/bin/llama-server" ]; then
    echo "building llama-server with CUDA (llama.cpp of llama-cpp-python ${version})"
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CUDA=ON \
        "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-native}" -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF >"$work/cmake-cuda.log"
    cmake --build "$build" --target llama-server -j "$(nproc)" >"$work/build-cuda.log"
fi
server="$build/bin/llama-server"
"$server" --version 2>&1 | head -n 1
"$server" --list-devices 2>&1 | sed -n '/Available devices/,$p'

model=$("$PY" -c "from appliance.default_model import default_model_path; print(default_model_path())")
port=$("$PY" -c "from appliance.serve.llama_server import free_port; print(free_port())")
log="$work/gpu_check_server.log"
"$server" --model "$model" --host 127.0.0.1 --port "$port" --gpu-layers all --ctx-size 2048 \
    --parallel 4 --jinja --no-webui >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT

APPLIANCE_GPU_CHECK_URL="http://127.0.0.1:$port" APPLIANCE_GPU_CHECK_LOG="$log" "$PY" - <<'PY'
import json, os, re, sys, time
import httpx

url, log = os.environ["APPLIANCE_GPU_CHECK_URL"], os.environ["APPLIANCE_GPU_CHECK_LOG"]
deadline = time.monotonic() + 180
while True:
    try:
        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
            break
    except httpx.TransportError:
        pass
    if time.monotonic() > deadline:
        sys.exit("gpu_check: llama-server never became ready; see " + log)
    time.sleep(0.2)
text = open(log, errors="replace").read()
offload = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
print("offloaded layers:", f"{offload.group(1)}/{offload.group(2)}" if offload else "not reported")
if not offload or offload.group(1) == "0":
    sys.exit("gpu_check: no layer was offloaded to the GPU")
body = {"prompt": "The history of the printing press begins", "n_predict": 256,
        "temperature": 0, "ignore_eos": True}
for label in ("warm-up", "measured"):
    answer = httpx.post(f"{url}/completion", json=body, timeout=300).json()
t = answer["timings"]
print(f"generate: {t['predicted_n']} tokens at {t['predicted_per_second']:.1f} tok/s; "
      f"prompt {t['prompt_n']} tokens at {t['prompt_per_second']:.1f} tok/s")
print(json.dumps({"offloaded": offload.group(0), "tokens_per_second":
                  round(t["predicted_per_second"], 1)}))
PY
