#!/usr/bin/env bash
# The GPU runs this repo still owes (NOTES.md says why), batched for a device call of at most
# 10 minutes each. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_pending.sh first   # ~9 min: tests, then the split-KV kernel at 8k of 32k and short
#   bash scripts/gpu_pending.sh long    # ~7 min: the split-KV kernel over a bf16 cache (FASTGEN_DECODE_KERNEL=1)
#                                       #   at 8k in a 32k cache and short, its tests; fp8 KV at B8 8k
#   bash scripts/gpu_pending.sh tests   # ~5 min: the whole GPU tier (last whole run: fa2c5d5, 2026-12-02)
#   bash scripts/gpu_pending.sh kv      # ~8 min: int8 KV decode with kv_attention's kernel off and on
#   bash scripts/gpu_pending.sh speed   # ~5 min: int8 batch-8 candidates; bf16 at 8k filled in a 32k cache (flex)
#   bash scripts/gpu_pending.sh flex    # ~6 min: flex decoding's SPLIT_KV at short context, 8B and SmolLM2 shapes
#   bash scripts/gpu_pending.sh package # ~8 min: which packaging of the decode step loads on CUDA (issue 19)
#   bash scripts/gpu_pending.sh moe     # ~9 min, H200 only: Mixtral-8x7B bf16 (93 GB) at batch 1 and 8 (issue 17)
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
first)
    # the whole tier (it holds the split-KV kernel's tests), then the kernel at 8k of 32k and short
    step tier 330 python -m pytest -m gpu -q -p no:cacheprovider -rf
    summary+=("  $(tail -n 1 "$out/tier.txt")")
    summary+=("$(grep -E '^FAILED' "$out/tier.txt" | head -8)")
    FASTGEN_DECODE_KERNEL=1 decode bf16_8k_of_32k_kernel 120 --ctx 8192 --cache 32768
    FASTGEN_DECODE_KERNEL=1 decode bf16_short_kernel 100
    ;;
long)
    step kernel_tests 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
        -k "decode_attention or split_kv or quantized_kv"
    summary+=("  $(tail -n 1 "$out/kernel_tests.txt")")
    FASTGEN_DECODE_KERNEL=1 decode bf16_8k_of_32k_kernel 120 --ctx 8192 --cache 32768
    FASTGEN_DECODE_KERNEL=1 decode bf16_short_kernel 100
    decode fp8_8k 120 --batch 8 --ctx 8192 --cache 8448 --kv-dtype fp8
    ;;
tests)
    # the whole tier: model.py's attention functions changed after the last green run (a7f0aae)
    step tier 570 python -m pytest -m gpu -q -p no:cacheprovider
    summary+=("  $(tail -n 1 "$out/tier.txt")")
    ;;
kv)
    decode kv_bf16_8k 130 --batch 8 --ctx 8192 --cache 8448
    FASTGEN_KV_KERNEL=0 decode kv_int8_8k_off 130 --batch 8 --ctx 8192 --cache 8448 --kv-dtype int8
    FASTGEN_KV_KERNEL=1 decode kv_int8_8k_on 130 --batch 8 --ctx 8192 --cache 8448 --kv-dtype int8
    FASTGEN_KV_KERNEL=1 decode kv_int8_short_on 100 --kv-dtype int8
    ;;
speed)
    step int8_rows8 150 python scripts/int8_gemv_sweep.py --rows 8
    summary+=("  $(grep -c '^| ' "$out/int8_rows8.txt") table lines in int8_rows8.txt")
    decode bf16_8k_of_32k 150 --ctx 8192 --cache 32768
    ;;
flex)
    decode bf16_short 120
    # flex decoding splits the cache in 2 * SMs / (B * Hkv) parts whatever its length (32 on an H200
    # for Llama-3-8B): at an 80-slot cache nearly all are empty, and merging them costs ~0.2 ms/step
    decode bf16_short_split1 100 --flex-decode-options '{"SPLIT_KV": 1}'
    decode smol_short 60 --model smollm2-135m
    decode smol_short_split1 60 --model smollm2-135m --flex-decode-options '{"SPLIT_KV": 1}'
    ;;
package)
    step package 560 python scripts/diag_cuda_package.py
    summary+=("$(tail -n 5 "$out/package.txt")")
    ;;
moe)
    step moe 560 python scripts/bench.py --suite moe --models mixtral-8x7b --weights bf16 --no-cold-start \
        --time-budget-s 520 --out-dir "$out/moe_bench"
    summary+=("$(grep -E '^\| mixtral' "$out/moe.txt" | head -4)")
    ;;
*)
    echo "unknown mode $mode: use long, tests, kv, speed, flex, package or moe" >&2
    exit 2
    ;;
esac
printf '%s\n' "${summary[@]}"
