#!/usr/bin/env bash
# The GPU runs this repo still owes (NOTES.md says why), batched for a device call of at most
# 10 minutes each. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_pending.sh grouped    # ~6 min: pending/int8_grouped_experts.patch applied on the device's
#                                          #   copy (int8 experts grouped by expert at 2-16 tokens), the MoE GPU
#                                          #   tests, Mixtral int8 B1/B8; then reversed: keep it (git apply) if
#                                          #   B8 beats 273.2 tok/s and the tests pass
#   bash scripts/gpu_pending.sh bf16experts # ~6 min: pending/bf16_expert_gemv.patch applied on the device's copy
#                                          #   (one token's bf16 experts through a Triton GEMV), the MoE GPU tests,
#                                          #   Qwen3-30B-A3B bf16 B1/B8; then reversed: keep it if B1 beats 228.7
#   bash scripts/gpu_pending.sh tests      # ~5 min: the whole GPU tier (last whole run: f22f62d, 81 passed)
#   bash scripts/gpu_pending.sh package    # ~8 min: which packaging of the decode step loads on CUDA (issue 19)
#   bash scripts/gpu_pending.sh moe        # ~9 min: MoE GPU tests, then Qwen3-30B-A3B / Mixtral bf16 and int8
#                                          #   at batch 1 and 8 (issue 17; int8 experts' GEMV re-run owed)
#
# Each step has its own timeout and log in $OUT (default ./gpu_out); the summary comes last.
set -u
mode=${1:-tests}
out=${OUT:-gpu_out}
mkdir -p "$out"
summary=()

step() {  # step NAME TIMEOUT_S command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    summary+=("$name: rc $rc, $((SECONDS - t0)) s")
}

decode() {  # decode NAME TIMEOUT_S profile_decode args...: one replayed-step line in the summary
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" python scripts/profile_decode.py --top 8 "$@"
    summary+=("  $(grep -h "replayed step" "$out/$name.txt" | head -1)")
}

case $mode in
grouped)
    git apply pending/int8_grouped_experts.patch || exit 2
    step moe_tests 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_moe.py
    summary+=("  $(tail -n 1 "$out/moe_tests.txt")")
    step mixtral_int8 300 python scripts/bench.py --suite moe --models mixtral-8x7b --weights int8 \
        --no-cold-start --time-budget-s 280 --out-dir "$out/moe_bench"
    summary+=("$(grep -E '^\| mixtral' "$out/mixtral_int8.txt" | head -2)")
    git apply -R pending/int8_grouped_experts.patch
    ;;
bf16experts)
    git apply pending/bf16_expert_gemv.patch || exit 2
    step moe_tests 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_moe.py
    summary+=("  $(tail -n 1 "$out/moe_tests.txt")")
    step qwen3_bf16 330 python scripts/bench.py --suite moe --models qwen3-30b-a3b --weights bf16 \
        --no-cold-start --time-budget-s 300 --out-dir "$out/moe_bench"
    summary+=("$(grep -E '^\| qwen3' "$out/qwen3_bf16.txt" | head -2)")
    git apply -R pending/bf16_expert_gemv.patch
    ;;
tests)
    step tier 570 python -m pytest -m gpu -q -p no:cacheprovider -rf
    summary+=("  $(tail -n 1 "$out/tier.txt")")
    summary+=("$(grep -E '^FAILED' "$out/tier.txt" | head -8)")
    ;;
package)
    step package 560 python scripts/diag_cuda_package.py
    summary+=("$(tail -n 5 "$out/package.txt")")
    ;;
moe)
    step moe_tests 120 python -m pytest -m gpu -q -p no:cacheprovider tests/test_moe.py
    summary+=("  $(tail -n 1 "$out/moe_tests.txt")")
    step moe 440 python scripts/bench.py --suite moe --models qwen3-30b-a3b,mixtral-8x7b --weights bf16,int8 \
        --no-cold-start --time-budget-s 400 --out-dir "$out/moe_bench"
    summary+=("$(grep -E '^\| (mixtral|qwen)' "$out/moe.txt" | head -8)")
    ;;
*)
    echo "unknown mode $mode: use grouped, bf16experts, tests, package or moe" >&2
    exit 2
    ;;
esac
printf '%s\n' "${summary[@]}"
