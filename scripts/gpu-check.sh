#!/usr/bin/env bash
# Checks and times Tessera's CUDA backend on this machine's GPU.
#
# Needs: one NVIDIA GPU with a CUDA 13 driver; CUDA's libraries from Python packages
# (PyTorch's pip install brings cuBLAS, NVRTC and NCCL; no CUDA toolkit needed); and a
# tessera binary built with the cuda feature, which needs no CUDA to build:
#
#     cargo build --release -p tessera --features cuda
#
# The binary is $TESSERA_BIN, else target/release/tessera, else
# target/x86_64-unknown-linux-gnu/release/tessera. The script finds the libraries, puts
# their directories on LD_LIBRARY_PATH, compiles every kernel (`tessera kernels`), then
# runs `tessera gpu-check --out $OUT` (default /tmp/tessera-gpu-check) under a time
# limit and exits with its status. The table it prints last is the result; the JSON
# beside it in $OUT has every number.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-/tmp/tessera-gpu-check}"
limit_s="${TESSERA_GPU_CHECK_TIMEOUT:-480}"
arch="${TESSERA_ARCH:-sm_90}"

say() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# --- the binary ---------------------------------------------------------------------
bin=""
for candidate in "${TESSERA_BIN:-}" "$root/target/release/tessera" \
    "$root/target/x86_64-unknown-linux-gnu/release/tessera"; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
        bin="$candidate"
        break
    fi
done
if [[ -z "$bin" ]]; then
    die "no tessera binary: set TESSERA_BIN, or build one where Rust is installed with
    cargo build --release -p tessera --features cuda
and bring target/release/tessera here (it loads CUDA at run time, so it builds without it)"
fi
say "binary: $bin"

# --- the GPU ------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    die "nvidia-smi not found: this machine has no NVIDIA driver (or it is not on PATH); \
the check needs an NVIDIA GPU"
fi
if ! nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader >&2; then
    die "nvidia-smi found no usable GPU"
fi

# --- CUDA libraries from Python packages ----------------------------------------------
# Every site-packages of the Pythons here (python3 on PATH and PyTorch's venv), searched
# by file name: wheel layouts differ (nvidia/cu13/lib, nvidia/cublas/lib, nvidia/nccl/lib…).
site_dirs=()
for py in python3 /opt/torch/.venv/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    while IFS= read -r d; do
        [[ -n "$d" && -d "$d" ]] && site_dirs+=("$d")
    done < <("$py" -c 'import site, sys
for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    print(p)' 2>/dev/null | sort -u)
done
[[ -d /opt/torch/.venv/lib ]] && site_dirs+=(/opt/torch/.venv/lib)

# find_lib NAME_GLOB: the directory of the first file matching it under nvidia/ of any
# site-packages (or anywhere under them, for other layouts).
find_lib() {
    local pattern="$1" d f
    for d in "${site_dirs[@]}"; do
        for base in "$d/nvidia" "$d"; do
            [[ -d "$base" ]] || continue
            f="$(find "$base" -maxdepth 5 -name "$pattern" \( -type f -o -type l \) 2>/dev/null | sort | head -n 1)"
            if [[ -n "$f" ]]; then
                dirname "$f"
                return 0
            fi
        done
    done
    return 1
}

lib_dirs=()
missing=()
for lib in 'libcublas.so.*' 'libcublasLt.so.*' 'libnvrtc.so.*' 'libnvrtc-builtins.so.*' 'libnccl.so.*'; do
    if dir="$(find_lib "$lib")"; then
        say "found ${lib%%.so*} in $dir"
        case " ${lib_dirs[*]-} " in *" $dir "*) ;; *) lib_dirs+=("$dir") ;; esac
    else
        missing+=("${lib%%.so*}")
    fi
done
if ((${#missing[@]})); then
    say "not found in any Python package: ${missing[*]} (searched: ${site_dirs[*]-none});"
    say "the system loader's path is tried for them (libnccl missing fails the nccl check only)"
fi
if ((${#lib_dirs[@]})); then
    joined="$(IFS=:; echo "${lib_dirs[*]}")"
    export LD_LIBRARY_PATH="$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

# --- kernels, then the check ------------------------------------------------------------
mkdir -p "$out" || die "cannot create $out"
# Outside $out, which then holds only the report.
export TESSERA_KERNEL_CACHE="${TESSERA_KERNEL_CACHE:-/tmp/tessera-kernel-cache}"
say "compiling every kernel for $arch"
if ! "$bin" kernels --arch "$arch"; then
    die "the kernels did not compile (above); the check needs them"
fi

say "running tessera gpu-check (limit ${limit_s} s), results in $out"
timeout --kill-after=20 "$limit_s" "$bin" gpu-check --out "$out" "$@"
status=$?
if ((status == 124 || status == 137)); then
    say "tessera gpu-check did not finish within ${limit_s} s"
fi
exit "$status"
