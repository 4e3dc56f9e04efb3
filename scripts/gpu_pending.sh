#!/usr/bin/env bash
# The GPU runs this repo still owes (NOTES.md says why), batched for a device call of at most
# 10 minutes each. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_pending.sh splittier  # ~9.5 min: SmolLM2 in one split and in 4 (the default) once each, then the
#                                          #   whole tier in TIER_LIMIT_S (390 s): one start
#   bash scripts/gpu_pending.sh splitmodels  # ~8.5 min: Llama-3-8B and Qwen3-30B-A3B bf16 B1 through bench.py with
#                                          #   FASTGEN_SINGLE_SPLIT_TILES 4 (the old default) and 1 (the default)
#   bash scripts/gpu_pending.sh issue11    # ~9.5 min: bench.py's quick suite without transformers (issue 11's rows, 200
#                                          #   new tokens): Llama-3-8B B1 / 32k / 8k of 32k / B8 and SmolLM2-135M
#   bash scripts/gpu_pending.sh smoltiles  # ~5 min: issue 11's SmolLM2-135M (0.426 ms replayed on the H100, 2026-12-05,
#                                          #   eighth session; 0.4 wanted): wqkv's tile now that its epilogue does RoPE
#                                          #   and the cache write, and wo's, each in the whole step
#   bash scripts/gpu_pending.sh tests-parallel  # ~7 min: the whole GPU tier over 8 pytest-xdist workers (xdist from
#                                          #   .whl: carry it; whole: 976e7c1 on an H100, 228 passed, 4 min 38 s)
#   bash scripts/gpu_pending.sh tests      # ~6 min: the same, one worker
#   bash scripts/gpu_pending.sh package    # ~8 min: which packaging of the decode step loads on CUDA (issue 19)
#   bash scripts/gpu_pending.sh moe        # ~9 min: MoE GPU tests, then Qwen3-30B-A3B / Mixtral bf16 and int8
#                                          #   at batch 1 and 8 (issue 17)
#   bash scripts/gpu_pending.sh moedown    # ~9.5 min: Qwen3-30B-A3B bf16 B8's whole step with expert_down_mix
#                                          #   (the default since 2026-12-04) and without (issue 17)
#   bash scripts/gpu_pending.sh cli        # ~8 min: generate.py --compile --json against the engine on the same
#                                          #   random checkpoints (issue 11's CLI within 5%; bench_cli.py)
#   bash scripts/gpu_pending.sh modes      # ~9.5 min: what issue 10's report still lacks: int4 g128 at batch 1
#                                          #   and 8, then int8 B1 beside gpt-fast bf16/int8 (carry peers/gpt-fast)
#   bash scripts/gpu_pending.sh fp8kv      # ~5 min: the fp8 cache's GPU tests, its step at B8 8k with the default
#                                          #   conversion (KV_FP8_VIA_F32) and Triton's, then bench.py bf16 / fp8 at
#                                          #   B8 8k (issue 10 wants 1.1x; H100, twelfth session: 1.121x)
#   bash scripts/gpu_pending.sh kvbench    # ~9.5 min: issue 10's KV targets through bench.py (B8 short and B8 with 8k
#                                          #   filled: bf16 / int8 / fp8 caches; fp8 at 8k never timed on the H100)
#   bash scripts/gpu_pending.sh int4grid   # ~9 min: the int4 GPU tests, the int4-g64 step with the folds and PDL
#                                          #   (FASTGEN_INT4_FOLD / _PDL) off and on, bench.py B1 with the fastest
#   bash scripts/gpu_pending.sh tierint4   # ~8 min: the int4-g64 step and bench.py's int4 B1 rows, then the whole
#                                          #   tier in TIER_LIMIT_S (240 s): one machine start for both
#   bash scripts/gpu_pending.sh int4foldbench  # ~5 min: bench.py's int4 g64/g128 rows at B1 and B8 with the env given
#   bash scripts/gpu_pending.sh int4probe  # ~8 min: int4_mma's tiles (the probe's whole grid) and 8 rows a weight pass
#   bash scripts/gpu_pending.sh moebench   # ~2 min: Qwen3-30B-A3B bf16 and Mixtral int8 B1 through bench.py (issue 17)
#   bash scripts/gpu_pending.sh ncukv      # ~5 min: Nsight Compute on the int8 and bf16 KV attention at B8 8k (issue
#                                          #   10: why int8 reads at half bf16's rate), if ncu is on the machine
#   bash scripts/gpu_pending.sh fusedsweep # ~6 min: each fused GEMV call alone (fused_gemv_sweep.py): plain vs
#                                          #   folded at the default tile, and the folded call's best tile, at SmolLM2,
#                                          #   Llama-3-8B and Qwen3-30B-A3B expert shapes: set decode_gemv_config from it
#                                          #   (H100, 2026-12-07: BENCHMARKS.md); cuBLAS beside them since
#   bash scripts/gpu_pending.sh batch32    # ~4 min: Llama-3-8B bf16 batch 1 and 32, short context (issue 11's 25x;
#                                          #   30.8x on the H100 at f2a76b4, not run on the H200 since B1 got faster)
#   bash scripts/gpu_pending.sh longctx    # ~3 min: Llama-3-8B bf16 B1 with 8k filled of a 32k cache, and B8 8k with
#                                          #   a bf16 / int8 KV cache (issue 11's 85% incl. KV: 4.979 ms, 76% at
#                                          #   16c7312 before the batch-1 GEMV; issue 10's KV 1.1x: 1.00x then)
#   bash scripts/gpu_pending.sh fusedrows  # ~4 min: the fused float block at 4 and 8 rows a program (Llama-3-8B,
#                                          #   SmolLM2): it lost at Llama's width with 2 (why float blocks wider
#                                          #   than gemv.FUSED_FLOAT_MAX_DIM are not fused)
#   bash scripts/gpu_pending.sh fusedint8  # ~4 min: int8 Llama-3-8B B1 without the fused block and with (default)
#   bash scripts/gpu_pending.sh fusedmoe   # ~5 min: Qwen3-30B-A3B B1 (12 layers) plain, with the fused attention
#                                          #   half, and with the token's experts through decode_gemv_experts too
#                                          #   (the default)
#   bash scripts/gpu_pending.sh nogamma    # ~2 min: issue 11's SmolLM2 step with the fused GEMVs' norm-weight read
#                                          #   removed, and with the attention kernel skipped (timing probes, wrong
#                                          #   numbers), default and probes alternating. H100, 2026-12-07: 0.429 ms a
#                                          #   step, nogamma 0.425, noattn 0.322: the bounds on a norm-weight fold
#                                          #   and on any cheaper attention
#   bash scripts/gpu_pending.sh attnwarps  # ~8.5 min: issue 11's SmolLM2 step with the one-split attention at 2 and 1
#                                          #   warps against 4 (a probe, alternating), then the whole tier on the
#                                          #   default in TIER_LIMIT_S (330 s)
#   bash scripts/gpu_pending.sh autotune   # ~5 min: Inductor's max-autotune against the default, SmolLM2-135M and
#                                          #   Llama-3-8B B1 (lost on both on the H200, 2026-12-04: kept to re-check
#                                          #   on a new torch)
#
# Modes whose runs are recorded in BENCHMARKS.md (int4rows, int4gemv, int4mma, int4default, pdl, pdltier, fusedcheck,
# next, floatgemv, moegateup, moeb1, ropeqkv, mega, megadot, megaphases, smolattn, downall, downbench, smolnext,
# mergewo, ninth, wholetiles, steptiles, wqkvtile, tier-int4, kvwhole, int8rope, shortk, int4fold, foldcheck,
# foldtiles, foldall, ropetiles, ropetier, poicode, early, nodown, fusedmlp, mlptier, expertw2, heads, steptail,
# defersum, atonce, earlyslots, earlytile, smallblock, tokenlog, logtier, splits) were removed between 2026-12-05 and
# 2026-12-08; git history has them.
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
    summary+=("  $(grep -h "without its token reads" "$out/$name.txt" | head -1)")
    summary+=("  $(grep -h "per step:" "$out/$name.txt" | head -1)")  # kernels a step, their share of it
    summary+=("  $(grep -h "a part of the reads" "$out/$name.txt" | head -1)")  # copies / event waits / both
    summary+=("  $(grep -h "arrival timed" "$out/$name.txt" | head -1)")  # generate()'s steady step
    summary+=("  $(grep -h "gaps between arrivals" "$out/$name.txt" | head -1)")  # and where its excess sits
}

parallel_tier() {  # parallel_tier TIMEOUT_S: the whole GPU tier over TIER_WORKERS (8) pytest-xdist workers
    # int4_mma's extension built once, before the workers (each would wait on torch's build lock; a no-op once
    # built). H100, 2026-12-06: the tier after three int4 steps on a fresh machine got through 17 tests in 330 s (the
    # extension was built; Inductor's cache cold; why so slow was not found); run again on that machine, all of it
    # in 222 s
    step build 200 python -c "import int4_mma; assert int4_mma.build() is not None"
    # xdist installed, or else the pure-Python wheels straight from .whl on the path (zip imports)
    python -c "import xdist" 2>/dev/null || export PYTHONPATH="$(ls -d "$PWD"/.whl/*.whl | tr '\n' ':')${PYTHONPATH:-}"
    # -v: a line per test, so a tier the device call's limit cuts short still says which tests ran and how they
    # ended (the twenty-second session's tier was cut at 205 of 236 by the device budget: no failure in them)
    tier "$1" -n "${TIER_WORKERS:-8}"
}

tier() {  # tier TIMEOUT_S [pytest args]: the GPU tier, a line per test (-v), its result line and failures in the summary
    local limit=$1
    shift
    step tier "$limit" python -m pytest -m gpu -v -p no:cacheprovider -rf "$@"
    summary+=("  $(tail -n 1 "$out/tier.txt")")
    summary+=("$(grep -E '^FAILED' "$out/tier.txt" | head -8)")
}

probe_file() {  # probe_file FILE: FILE's landed text kept aside for probe, and put back when the script exits
    cp "$1" "$out/$1.default"
    trap "cp '$out/$1.default' '$1'" EXIT
}

probe() {  # probe FILE [SED]: FILE's landed text, then SED's edit, whose line says "  # PROBE": fails (and says so in
    # the summary) if none does
    cp "$out/$1.default" "$1"
    [ $# -lt 2 ] || { sed -i "$2" "$1" && grep -q "  # PROBE" "$1"; } || { summary+=("$1: the probed line was not found"); false; }
}

case $mode in
tests)
    tier 570
    ;;
tests-parallel)
    parallel_tier 570
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
moedown)
    # the whole 48-layer model: 190 s each did not fit the compile (2026-12-04, nothing printed); the
    # 12-layer step went 3.501 -> 2.646 ms with the kernel, now the default; the gate/up kernel (default)
    # took it on to 2.281, and the whole step at B8 with both ran 8.486 ms (2026-12-04)
    decode qwen3_b8_kernel 280 --model qwen3-30b-a3b --batch 8
    FASTGEN_EXPERT_DOWN_KERNEL=0 decode qwen3_b8_inductor 280 --model qwen3-30b-a3b --batch 8
    ;;
cli)
    step cli 560 python scripts/bench_cli.py --workdir "${TMPDIR:-/tmp}/fastgen-bench-cli"
    summary+=("$(grep -E '^\| ' "$out/cli.txt")")
    ;;
modes)
    # what issue 10's every-mode report still lacks after 2026-12-04 (BENCHMARKS.md): int4 g128 at batch 1
    # and 8, gpt-fast int8 beside ours. A compiled Llama-3-8B job takes 45-90 s the first time, gpt-fast's
    # ~135 s: the bench's time budget drops what does not fit.
    common=(--suite smoke --models llama-3-8b --compile --new-tokens 100 --runs 2 --no-hf --no-cold-start)
    step int4 200 python scripts/bench.py "${common[@]}" --batch 1,8 --weights int4-g128 --time-budget-s 180 \
        --out-dir "$out/modes_int4"
    summary+=("$(grep -E '^\| llama' "$out/int4.txt")")
    [ -d peers/gpt-fast ] && common+=(--gpt-fast-dir peers/gpt-fast)
    step int8 360 python scripts/bench.py "${common[@]}" --batch 1 --weights int8 --time-budget-s 340 \
        --out-dir "$out/modes_int8"
    summary+=("$(grep -E '^\| llama' "$out/int8.txt")")
    ;;
kvbench)
    # issue 10's KV targets through bench.py itself (the issue's instrument; met in profile_decode.py's replayed
    # step on the H100, 2026-12-05, tenth session: B8 8k 1.134x, B8 short int8 1.4% faster, B1 0.9% slower)
    common=(--suite smoke --models llama-3-8b --compile --new-tokens 100 --runs 2 --no-hf --no-cold-start)
    [ "${SKIP_SHORT:-0}" = 1 ] || step kv_short 290 python scripts/bench.py "${common[@]}" --batch 8 --kv-dtypes bf16,int8,fp8 \
        --time-budget-s 270 --out-dir "$out/kv_short"
    [ "${SKIP_SHORT:-0}" = 1 ] || summary+=("$(grep -E '^\| (model|llama)' "$out/kv_short.txt")")
    # 8000 filled + 100 new tokens: Llama-3-8B's context is 8192 (bench_plan skips a cache past it)
    step kv_8k 290 python scripts/bench.py "${common[@]}" --batch 8 --ctx 8000 --kv-dtypes bf16,int8,fp8 \
        --time-budget-s 270 --out-dir "$out/kv_8k"
    summary+=("$(grep -E '^\| llama' "$out/kv_8k.txt")")
    ;;
splittier)
    # the next session's first call (2026-12-08, NOTES' queue 0): SmolLM2 with its cache in one split
    # (FASTGEN_SINGLE_SPLIT_TILES=4, the old default) and in 4 splits (the default since a775ea2) once each, then the
    # whole tier on the default in TIER_LIMIT_S (390 s): one machine start for both
    FASTGEN_SINGLE_SPLIT_TILES=4 decode smol_one 90 --model smollm2-135m --new-tokens 200
    decode smol_split 90 --model smollm2-135m --new-tokens 200
    parallel_tier "${TIER_LIMIT_S:-390}"
    ;;
splitmodels)
    # the models the one split was chosen for, under both limits (FASTGEN_SINGLE_SPLIT_TILES 4: one split up to 4
    # tiles, the old default; 1: the default since a775ea2): Llama-3-8B bf16 B1 and Qwen3-30B-A3B bf16 B1 through
    # bench.py (200 / 100 new tokens: 216 / 116-slot caches). SPLIT_MODELS="llama qwen3" by default
    for model in ${SPLIT_MODELS:-llama qwen3}; do
        for tiles in 4 1; do
            if [ "$model" = llama ]; then
                FASTGEN_SINGLE_SPLIT_TILES=$tiles step "llama_$tiles" 110 python scripts/bench.py --suite smoke \
                    --models llama-3-8b --compile --new-tokens 200 --runs 3 --no-hf --no-cold-start \
                    --out-dir "$out/llama_$tiles"
                summary+=("  FASTGEN_SINGLE_SPLIT_TILES=$tiles $(grep -E '^\| llama' "$out/llama_$tiles.txt")")
            else
                FASTGEN_SINGLE_SPLIT_TILES=$tiles step "qwen3_$tiles" 150 python scripts/bench.py --suite moe \
                    --models qwen3-30b-a3b --weights bf16 --batch 1 --no-cold-start --time-budget-s 130 \
                    --out-dir "$out/qwen3_$tiles"
                summary+=("  FASTGEN_SINGLE_SPLIT_TILES=$tiles $(grep -E '^\| qwen' "$out/qwen3_$tiles.txt" | head -1)")
            fi
        done
    done
    ;;
issue11)
    # issue 11's instrument: bench.py's quick suite (200 new tokens, median of 3, compiled; the H100's copy in the
    # same run) without transformers: Llama-3-8B B1, 32k cache, 8k of 32k, B8, and SmolLM2-135M (2500 wanted; the
    # smoke rows above ran 8 new tokens, whose first step's sync weighs on 7 steps)
    step quick 560 python scripts/bench.py --suite quick --no-hf --no-cold-start --time-budget-s 500 \
        --out-dir "$out/quick"
    summary+=("$(grep -E '^\| (model|llama|smollm2)' "$out/quick.txt")")
    ;;
smoltiles)
    # wqkv's tile carrying RoPE and the cache write: a rope launch takes the glu tiles (a program's BLOCK_N pairs
    # are 2 * BLOCK_N rows), the small glu tile 2 / 1024 / 2 by default, never swept with the epilogue; wo
    # (576 x 576) takes the plain 2 / 1024 / 4. Each against the default in the whole step, one run.
    decode smol 45 --model smollm2-135m --new-tokens 256
    for t in 960,576,glu=1/1024/2 960,576,glu=1/1024/4 960,576,glu=4/1024/4 576,576=1/1024/2 576,576=2/1024/2 \
        576,576=4/1024/4; do
        decode "smol_${t//[,=\/]/_}" 45 --model smollm2-135m --new-tokens 256 --tile "$t"
    done
    ;;
int4grid)
    # issue 10's int4 at 450 tok/s: the int4 GPU tests (the first builds the extension, ~1.5 min), then the int4-g64
    # step with the folds (FASTGEN_INT4_FOLD) and PDL (FASTGEN_INT4_PDL) off and on, then bench.py's g64 / g128 B1
    # rows with the fastest of the four. int4fold's run (2026-12-06, fifteenth session) read 2.641 / 2.650 ms with
    # the folds off / on, after 2.364 in the fourteenth: the PDL prefetch then ran without PDL too (since fixed)
    step int4_tests 240 python -m pytest -m gpu -q -p no:cacheprovider -rf tests/test_gpu.py -k int4
    summary+=("  $(tail -n 1 "$out/int4_tests.txt")")
    summary+=("$(grep -E '^FAILED' "$out/int4_tests.txt" | head -6)")
    best="" best_ms=99
    for pdl in ${INT4_GRID_PDL:-0 1}; do  # INT4_GRID_PDL=0: PDL off only
        for fold in 0 1; do
            summary+=("FASTGEN_INT4_FOLD=$fold FASTGEN_INT4_PDL=$pdl:")
            FASTGEN_INT4_FOLD=$fold FASTGEN_INT4_PDL=$pdl TORCH_LOGS=${INT4_GRID_LOGS:-} \
                decode "int4_g64_fold${fold}_pdl$pdl" 80 --model llama-3-8b --weights int4-g64 --new-tokens 200 --top 14
            ms=$(grep -ohE "replayed step [0-9.]+" "$out/int4_g64_fold${fold}_pdl$pdl.txt" | grep -oE "[0-9.]+$")
            if [ -n "$ms" ] && awk "BEGIN{exit !($ms < $best_ms)}"; then best="$fold $pdl" best_ms=$ms; fi
        done
    done
    read -r fold pdl <<<"${best:-0 0}"
    summary+=("bench.py with FASTGEN_INT4_FOLD=$fold FASTGEN_INT4_PDL=$pdl (the fastest step, $best_ms ms):")
    FASTGEN_INT4_FOLD=$fold FASTGEN_INT4_PDL=$pdl step int4_bench 170 python scripts/bench.py --suite smoke \
        --models llama-3-8b --ctx 16 --cache just --compile --new-tokens 200 --runs 3 --no-hf --no-cold-start \
        --weights int4-g64,int4-g128 --batch 1 --time-budget-s 160 --out-dir "$out/int4_bench"
    summary+=("$(grep -E '^\| llama' "$out/int4_bench.txt")")
    ;;
tierint4)
    # the default int4-g64 step (the folds on; the first process builds int4_mma) and bench.py's g64 / g128 B1 rows,
    # then the whole tier in what is left: one call when only one machine start is left. Write into $OUT itself:
    # a call cut short still brings back what is there
    decode int4_g64 150 --model llama-3-8b --weights int4-g64 --new-tokens 200 --top 14
    step int4_bench 80 python scripts/bench.py --suite smoke --models llama-3-8b --ctx 16 --cache just --compile \
        --new-tokens 200 --runs 3 --no-hf --no-cold-start --weights int4-g64,int4-g128 --batch 1 \
        --time-budget-s 75 --out-dir "$out/int4_bench"
    summary+=("$(grep -E '^\| llama' "$out/int4_bench.txt")")
    parallel_tier "${TIER_LIMIT_S:-240}"
    ;;
int4foldbench)
    # bench.py's int4 rows (issue 10's instrument) with the env given (e.g. FASTGEN_INT4_FOLD=1 FASTGEN_INT4_PDL=1)
    step int4_bench 280 python scripts/bench.py --suite smoke --models llama-3-8b --ctx 16 --cache just --compile \
        --new-tokens 200 --runs 3 --no-hf --no-cold-start --weights int4-g64,int4-g128 --batch 1,8 \
        --time-budget-s 270 --out-dir "$out/int4_bench"
    summary+=("$(grep -E '^\| llama' "$out/int4_bench.txt")")
    ;;
int4probe)
    # int4_mma's tiles: scripts/int4_mma_probe.py's whole grid at one row (2 / 4 tiles,
    # 4-32 warps, with and without the prefetch), then 8 rows in one weight pass against tinygemm at 8 rows
    step int4probe_grid 330 python scripts/int4_mma_probe.py
    summary+=("$(grep -E '^\||g(64|128) ' "$out/int4probe_grid.txt")")
    step int4probe_rows8 200 python scripts/int4_mma_probe.py --quick --rows 8
    summary+=("$(grep -E '^\||g(64|128) ' "$out/int4probe_rows8.txt")")
    ;;
moebench)
    # ~6 min: issue 17 on an H100: Qwen3-30B-A3B bf16 B1 (59.5% of copy before the in-place decode loop) and
    # Mixtral int8 B1 (63% on the H200; not on an H100 since the int8 expert GEMV), copy in the same run
    step qwen3_bench 175 python scripts/bench.py --suite moe --models qwen3-30b-a3b --weights bf16 --batch 1 \
        --no-cold-start --time-budget-s 130
    summary+=("$(grep -iE 'copy|^\| qwen' "$out/qwen3_bench.txt" | head -3)")
    step mixtral_bench 175 python scripts/bench.py --suite moe --models mixtral-8x7b --weights int8 --batch 1 \
        --no-cold-start --time-budget-s 130
    summary+=("$(grep -iE 'copy|^\| mixtral' "$out/mixtral_bench.txt" | head -3)")
    ;;
ncukv)
    # issue 10's int8 KV: at B8 8k its attention reads 134 MB a layer at ~2.3 TB/s, bf16's 268 MB at 4.2,
    # and the fp16 tiles (fewer instructions a K/V element) did not move it: Nsight Compute's stall reasons
    # and memory throughput for the default launch of each (the first launch of --case is the default)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ -z "$NCU" ]; then
        summary+=("ncu: not on this machine")
    else
        for case in "int8 B8" "bf16 B8"; do
            step "ncu_${case// /_}" 200 "$NCU" --set full -k regex:_quantized_decode_kernel -c 1 \
                python scripts/kv_kernel_sweep.py --quick --case "$case" --time-budget-s 5
            summary+=("$(grep -E 'Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy' \
                "$out/ncu_${case// /_}.txt" | head -8)")
        done
    fi
    ;;
fusedsweep)
    step fusedsweep 560 python scripts/fused_gemv_sweep.py
    summary+=("$(grep -E '^\| ' "$out/fusedsweep.txt")")
    ;;
batch32)
    step batch32 280 python scripts/bench.py --suite smoke --models llama-3-8b --weights bf16 --batch 1,32 --ctx 16 \
        --compile --new-tokens 100 --runs 2 --no-cold-start --no-hf --time-budget-s 260 --out-dir "$out/batch32"
    summary+=("$(grep -E '^\| llama' "$out/batch32.txt")")
    ;;
fp8kv)
    # issue 10's fp8 cache at B8 8k. H100, 2026-12-06 (twelfth session): KV_FP8_VIA_F32 (the default since)
    # 8.041 ms replayed against Triton's conversion's 8.538; bench.py 1001.3 tok/s against bf16's 893.3 = 1.121x
    step fp8_tests 150 python -m pytest -m gpu -q -p no:cacheprovider -rf tests/test_gpu.py -k "fp8"
    summary+=("  $(tail -n 1 "$out/fp8_tests.txt")")
    summary+=("$(grep -E '^FAILED' "$out/fp8_tests.txt" | head -6)")
    fp8_b8_8k=(--model llama-3-8b --batch 8 --ctx 8192 --kv-dtype fp8)
    decode llama_b8_8k_fp8kv 110 "${fp8_b8_8k[@]}"
    FASTGEN_KV_FP8_VIA_F32=0 decode llama_b8_8k_fp8kv_triton_conversion 110 "${fp8_b8_8k[@]}"
    step kv_8k_fp8 200 python scripts/bench.py --suite smoke --models llama-3-8b --compile --new-tokens 100 --runs 2 \
        --no-hf --no-cold-start --batch 8 --ctx 8000 --kv-dtypes bf16,fp8 --time-budget-s 180 --out-dir "$out/kv_8k_fp8"
    summary+=("bench.py:" "$(grep -E '^\| llama' "$out/kv_8k_fp8.txt")")
    ;;
longctx)
    decode llama_8k_of_32k 110 --model llama-3-8b --ctx 8192 --cache 32768
    decode llama_b8_8k_bf16kv 110 --model llama-3-8b --batch 8 --ctx 8192
    decode llama_b8_8k_int8kv 110 --model llama-3-8b --batch 8 --ctx 8192 --kv-dtype int8
    ;;
fusedrows)
    # the fused float block lost at Llama-3-8B's width with 2 rows a program (4.833 vs 4.144 ms unfused,
    # 2026-12-04): does 4 or 8 rows a program (the folds' L2 re-reads amortised over more rows) win it back?
    rows_profile() {  # rows_profile NAME ROWS MODEL
        step "$1" 110 env FASTGEN_FUSED_DECODE=1 python -c "import runpy, sys; sys.path.insert(0, '.'); import gemv
base = gemv.decode_gemv_config
gemv.decode_gemv_config = lambda n, k: {**base(n, k), 'BLOCK_N': $2}
sys.argv = ['profile_decode.py', '--top', '8', '--model', '$3']
runpy.run_path('scripts/profile_decode.py', run_name='__main__')"
        summary+=("  $(grep -h "replayed step" "$out/$1.txt" | head -1)")
    }
    rows_profile llama_fused_rows4 4 llama-3-8b
    rows_profile llama_fused_rows8 8 llama-3-8b
    rows_profile smol_fused_rows4 4 smollm2-135m
    ;;
fusedint8)
    # 2026-12-04 (third session): 3.061 -> 2.995 ms with the fused block (now the default for int8 blocks)
    FASTGEN_FUSED_DECODE=0 decode llama_int8 100 --model llama-3-8b --weights int8
    decode llama_int8_fused 100 --model llama-3-8b --weights int8
    ;;
fusedmoe)
    # 2026-12-04 (third session): 1.109 / 0.999 / 0.965 ms (the last is the default now)
    FASTGEN_FLOAT_GEMV=0 FASTGEN_FUSED_DECODE=0 FASTGEN_EXPERT_GEMV=0 decode qwen3_b1 100 --model qwen3-30b-a3b --layers 12
    FASTGEN_EXPERT_GEMV=0 decode qwen3_b1_fused 100 --model qwen3-30b-a3b --layers 12
    decode qwen3_b1_experts 100 --model qwen3-30b-a3b --layers 12
    ;;
nogamma)
    # the upper bound of folding each RMSNorm's weight into the next projection's weight (NOTES.md's untried idea):
    # the fused kernel's load of the norm weight dropped, everything else as is. Predicted small (<= ~10 us a step):
    # that load is issued with the weight rows', its latency hidden by theirs. Restored after, whatever happens
    probe_file gemv.py
    # noattn: the batch-1 attention kernel skipped (q stands for its output): the bound on any fusion of the
    # attention into a neighbouring kernel (one kernel boundary a layer fewer; its work gone too)
    for form in default nogamma noattn default nogamma noattn; do
        case $form in
        default) edit=() ;;
        nogamma) edit=('s/^\(\s*\)x = x \* tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)$/\1pass  # PROBE/') ;;
        noattn) edit=('s/^\(\s*\)return attend(q, cache).to(x1.dtype).reshape(1, -1)$/\1return q.to(x1.dtype).reshape(1, -1)  # PROBE/') ;;
        esac
        probe gemv.py "${edit[@]}" || break
        decode "smol_$form" 100 --model smollm2-135m --new-tokens 200
    done
    ;;
attnwarps)
    # issue 11's SmolLM2 step with the batch-1 one-split attention (3 programs, 4 tiles each) launched at 2 and 1
    # warps instead of 4, alternating with the default: fewer warps, fewer cross-warp softmax reductions through
    # shared memory on the chain (a probe: NUM_WARPS is every split launch's). Then the whole tier on the default,
    # in TIER_LIMIT_S (330 s): one machine start for both. 90 s a form: the first compiles on a cold Inductor cache
    # ATTN_FORMS: other launches as wWARPSsSTAGES (H100, 2026-12-07, twenty-third session: w2 and w1 lost 3.3%
    # and 8%; then ATTN_FORMS="default w8s3 w4s2 default w8s3 w4s2" TIER_LIMIT_S=0). TIER_LIMIT_S=0: no tier
    probe_file kv_attention.py
    for form in ${ATTN_FORMS:-default w2s3 w1s3 default w2s3 w1s3}; do
        edit=()
        [ "$form" = default ] || edit=("s/^NUM_WARPS, NUM_STAGES = 4, 3 /NUM_WARPS, NUM_STAGES = $(echo "${form#w}" | sed 's/s/, /')  # PROBE/")
        probe kv_attention.py "${edit[@]}" || break
        decode "smol_$form" 90 --model smollm2-135m --new-tokens 200
    done
    probe kv_attention.py  # the landed text for the tier
    [ "${TIER_LIMIT_S:-330}" = 0 ] || parallel_tier "${TIER_LIMIT_S:-330}"
    ;;
autotune)
    decode smol 90 --model smollm2-135m
    TORCHINDUCTOR_MAX_AUTOTUNE=1 decode smol_autotune 150 --model smollm2-135m
    decode llama 100 --model llama-3-8b
    TORCHINDUCTOR_MAX_AUTOTUNE=1 decode llama_autotune 200 --model llama-3-8b
    ;;
*)
    echo "unknown mode $mode: use tests, tests-parallel, splittier, splitmodels, package, moe, moedown, cli, modes, fp8kv, kvbench, issue11, int4grid, tierint4, int4foldbench, int4probe, smoltiles, moebench, ncukv, fusedsweep, batch32, longctx, fusedrows, fusedint8, fusedmoe, nogamma, attnwarps or autotune" >&2
    exit 2
    ;;
esac
printf '%s\n' "${summary[@]}"
