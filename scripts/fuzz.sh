#!/usr/bin/env bash
# Builds the fuzz targets under fuzz/ and runs each for SECONDS (default 20), starting from
# its committed corpus (fuzz/corpus/TARGET) and dictionary (fuzz/dict/TARGET.dict). Prints
# every target's executions and executions per second; exits non-zero if any target
# crashed, naming the input that did.
#
#   scripts/fuzz.sh [--ci] [SECONDS_PER_TARGET]
#
# By default the targets are optimised and run under AddressSanitizer, which also catches
# absurd allocations (libFuzzer's -malloc_limit_mb). --ci builds them unoptimised and
# without a sanitizer, in about a third of the time: a short pass still finds panics and
# overflows (debug assertions are on either way), at a few times fewer executions a second.
#
# Needs only the stable toolchain: cargo-fuzz comes from crates.io (installed once under
# TESSERA_FUZZ_TOOLS, by default $TMPDIR/tessera-fuzz-tools), and RUSTC_BOOTSTRAP=1 lets
# stable rustc take the sanitizer and coverage flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."

build=(--release --sanitizer address)
if [ "${1:-}" = "--ci" ]; then
    build=(--dev --sanitizer none)
    export CARGO_INCREMENTAL=0
    shift
fi
seconds="${1:-20}"
tools="${TESSERA_FUZZ_TOOLS:-${TMPDIR:-/tmp}/tessera-fuzz-tools}"
cargo_fuzz_version=0.13.2

started=$(date +%s)
if ! cargo fuzz --version >/dev/null 2>&1; then
    if [ ! -x "$tools/bin/cargo-fuzz" ]; then
        echo "== installing cargo-fuzz $cargo_fuzz_version into $tools"
        cargo install cargo-fuzz --locked --version "$cargo_fuzz_version" --root "$tools"
    fi
    export PATH="$tools/bin:$PATH"
fi
export RUSTC_BOOTSTRAP=1

echo "== fuzz build (${build[*]}; $(cargo fuzz --version))"
cargo fuzz build "${build[@]}"
echo "ready in $(($(date +%s) - started)) s"

# New inputs go to a scratch corpus; the committed one is only read.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for target in $(cargo fuzz list); do
    echo "== fuzz $target for $seconds s"
    mkdir -p "$scratch/$target" "fuzz/corpus/$target"
    log="$scratch/$target.log"
    dict=()
    if [ -f "fuzz/dict/$target.dict" ]; then
        dict=(-dict="fuzz/dict/$target.dict")
    fi
    if cargo fuzz run "${build[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        "${dict[@]}" >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed+=("$target")
        tail -n 60 "$log"
    fi
    execs=$(awk '/stat::number_of_executed_units:/ { n = $2 } END { print n + 0 }' "$log")
    rate=$(awk '/stat::average_exec_per_sec:/ { n = $2 } END { print n + 0 }' "$log")
    summary+=("$(printf '%-18s %-6s %12s execs %8s exec/s' "$target" "$status" "$execs" "$rate")")
done

echo "== fuzz summary ($seconds s per target, $(($(date +%s) - started)) s in all)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]}; the inputs are under fuzz/artifacts/ (replay one with" \
        "RUSTC_BOOTSTRAP=1 cargo fuzz run ${build[*]} TARGET fuzz/artifacts/TARGET/FILE)"
    exit 1
fi
