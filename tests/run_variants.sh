#!/usr/bin/env bash
# The test suite under the conditions it must pass in, one variant after another:
#
#   threads1  one torch/BLAS thread                 OMP_NUM_THREADS=1
#   threads4  four torch/BLAS threads               OMP_NUM_THREADS=4 MKL_DYNAMIC=FALSE (more threads than
#             cores are honoured too; the run stops if torch reports another count)
#   random    a random order (pytest-randomly), its seed printed so that a failure can be replayed
#   twice     the plain run twice in a row in one checkout, then a check that it left no file behind
#   avx2      MKL, torch's kernels and oneDNN on the AVX2 code path (x86-64 only)
#   sse42     the same on the SSE4.2 code path (x86-64 only)
#
# Usage (from anywhere; pytest arguments, such as test paths, go through, the default is the whole suite):
#
#   bash tests/run_variants.sh
#   bash tests/run_variants.sh tests/measure/test_engine.py -x
#   VARIANTS="random sse42" bash tests/run_variants.sh
#   SEED=12345 VARIANTS=random bash tests/run_variants.sh        # replay the order of a failed random run
#
# Every variant runs even when one fails; the summary names the failures and the exit status is non-zero.
# The plain command (`.venv/bin/python -m pytest -q`) keeps its fixed order: pyproject's addopts hold
# `-p no:randomly`, which `-p randomly` here overrides.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VARIANTS=${VARIANTS:-threads1 threads4 random twice avx2 sse42}
if [ $# -eq 0 ]; then set -- tests; fi
failed=()

say() { printf '\n===== %s\n' "$*"; }

# torch's thread count and CPU capability under the given environment (what the tests will see)
describe() {
    env "$@" "$PY" -c 'import torch; print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())'
}

# run NAME [VAR=VALUE ...] -- PYTEST_ARGS...: one pytest run, recorded as failed under NAME if it fails
run() {
    local name=$1; shift
    local vars=()
    while [ "$1" != "--" ]; do vars+=("$1"); shift; done
    shift
    say "$name: ${vars[*]:-(plain environment)} | torch threads, capability: $(describe "${vars[@]}")"
    if ! env "${vars[@]}" "$PY" -m pytest -q "$@"; then failed+=("$name"); fi
}

# every path in the checkout but the interpreter, git and the tools' own caches
snapshot() {
    find . \( -path ./.venv -o -path ./.git -o -name __pycache__ -o -name .pytest_cache -o -name .hypothesis \
        -o -name .ruff_cache -o -name '*.egg-info' \) -prune -o -print | sort
}

x86=$([ "$(uname -m)" = x86_64 ] && echo yes || echo no)
for variant in $VARIANTS; do
    case $variant in
        threads1) run threads1 OMP_NUM_THREADS=1 -- "$@" ;;
        threads4)
            got=$(describe OMP_NUM_THREADS=4 MKL_DYNAMIC=FALSE | cut -d' ' -f1)
            if [ "$got" != 4 ]; then
                say "threads4: torch reports $got threads under OMP_NUM_THREADS=4"; failed+=(threads4)
            else
                run threads4 OMP_NUM_THREADS=4 MKL_DYNAMIC=FALSE -- "$@"
            fi ;;
        random)
            seed=${SEED:-$("$PY" -c 'import random; print(random.randrange(2**32))')}
            say "random order with --randomly-seed=$seed; replay: SEED=$seed VARIANTS=random bash tests/run_variants.sh $*"
            run "random (seed $seed)" -- -p randomly --randomly-seed="$seed" "$@" ;;
        twice)
            before=$(mktemp); after=$(mktemp)
            snapshot >"$before"
            run "twice (first run)" -- "$@"
            run "twice (second run)" -- "$@"
            snapshot >"$after"
            if ! diff "$before" "$after" >/dev/null; then
                say "twice: the runs left these paths behind in the checkout (> new, < gone):"
                diff "$before" "$after" | grep '^[<>]'
                failed+=("twice (files left behind)")
            fi
            rm -f "$before" "$after" ;;
        avx2|sse42)
            if [ "$x86" != yes ]; then say "$variant: skipped, not an x86-64 machine"; continue; fi
            if [ "$variant" = avx2 ]; then
                run avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 -- "$@"
            else
                run sse42 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 -- "$@"
            fi ;;
        *) say "unknown variant '$variant' (known: threads1 threads4 random twice avx2 sse42)"; failed+=("$variant") ;;
    esac
done

if [ ${#failed[@]} -eq 0 ]; then
    say "every variant passed: $VARIANTS"
else
    say "failed: ${failed[*]}"
    exit 1
fi
