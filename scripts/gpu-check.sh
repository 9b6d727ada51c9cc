#!/usr/bin/env bash
# The CUDA backend on a machine with an NVIDIA GPU, in one run: builds with the cuda feature,
# compiles every kernel for the GPU's architecture, runs the CUDA tests against the CPU
# backend with a GPU required (op by op, paged attention, gpt2-tiny at TP 1 and 2), then
# serves gpt2-tiny on the GPU and generates through the real coordinator and worker.
#
#   scripts/gpu-check.sh            # GPU 0
#   TESSERA_CUDA_DEVICE=3 scripts/gpu-check.sh
#
# NVRTC and cuBLAS come from the system where the loader finds them, else from PyPI, with
# NVRTC pinned to the driver's CUDA version (a newer NVRTC writes PTX the driver cannot load).
set -euo pipefail
cd "$(dirname "$0")/.."
device=${TESSERA_CUDA_DEVICE:-0}

nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total --format=csv
cuda_version=$(nvidia-smi | grep -o 'CUDA Version: [0-9]*\.[0-9]*' | grep -o '[0-9.]*$')
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i "$device" | tr -d ' .')
arch="sm_$cap"
echo "driver CUDA $cuda_version, GPU $device is $arch"

if ! ldconfig -p | grep -q 'libnvrtc.so.13' || ! ldconfig -p | grep -q 'libcublas.so.13'; then
    venv="${TMPDIR:-/tmp}/tessera-gpu-venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvrtc==${cuda_version}.*" nvidia-cublas
    lib=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export TESSERA_REQUIRE_GPU=1 TESSERA_REQUIRE_NVRTC=1 TESSERA_CUDA_DEVICE="$device"

echo "== build"
cargo build -p tessera --features cuda
tessera=target/debug/tessera

echo "== kernels for $arch"
"$tessera" kernels --arch "$arch"

echo "== the CUDA backend against the CPU backend"
cargo test -p tessera-runtime --features cuda --lib cuda
cargo test -p tessera-runtime --features cuda --test cuda_backend -- --nocapture --test-threads 1

echo "== serve gpt2-tiny on GPU $device and generate"
log=$(mktemp)
"$tessera" serve --backend cuda --devices "$device" --tp 1 --preset gpt2-tiny \
    --listen 127.0.0.1:50071 --http-listen 127.0.0.1:8071 >"$log" 2>&1 &
serve=$!
trap 'kill "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    grep -q "Tessera is serving" "$log" && break
    if ! kill -0 "$serve" 2>/dev/null; then
        cat "$log"
        echo "serve exited during start-up" >&2
        exit 1
    fi
    sleep 1
done
grep -q "Tessera is serving" "$log" || { cat "$log"; echo "serve did not start in 120 s" >&2; exit 1; }
"$tessera" generate --endpoint 127.0.0.1:50071 --prompt "The cluster" --max-tokens 16
grep -E "CUDA backend on" "$log" || true
echo "gpu-check: passed"
