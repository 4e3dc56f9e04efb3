"""Sweep gemv.py's int8 GEMV tile sizes on the Llama-3-8B projections (batch 1) and print GB/s.

    python scripts/int8_gemv_sweep.py          # one GPU, about a minute
    python scripts/int8_gemv_sweep.py --wide   # also 16/32 rows, 2048-wide K steps, 16 warps (~3 min)
    python scripts/int8_gemv_sweep.py --convert   # each int8 -> fp32 conversion (gemv._int8_to_fp32)
    python scripts/int8_gemv_sweep.py --rows 8    # batch 8: today's path against the two multi-row kernels

Bytes per call = int8 weight + scales + x + y. Beside each shape: the bf16 cuBLAS GEMV reading
the same weight in bf16 (twice the bytes) and the best config; gemv.int8_gemv_config picks from this.
"""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import gemv  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336), "output": (128256, 4096)}
CONFIGS = [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
    for n, k, w, s in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3, 5))
]
# More bytes in flight per program (an H200 needs more than an H100 to reach its bandwidth); each
# thread holds BLOCK_N * BLOCK_K / (32 * num_warps) fp32 accumulators, kept to 8..128.
WIDE_CONFIGS = [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
    for n, k, w, s in itertools.product((4, 8, 16, 32), (512, 1024, 2048), (4, 8, 16), (1, 3))
    if 8 <= n * k // (32 * w) <= 128
]


# --convert: every conversion over a smaller tile set (a cheaper conversion may want other tiles)
CONVERT_CONFIGS = [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s, CONVERT=c)
    for c, n, k, w, s in itertools.product((0, 1, 2), (4, 8, 16), (512, 1024, 2048), (4, 8), (1, 3))
    if 8 <= n * k // (32 * w) <= 128
]


def launch(x, w, s, cfg):
    """One row through decode_gemv's kernel at the tiles of cfg (CONVERT defaults to gemv.INT8_CONVERT)."""
    return gemv._decode_gemv_launch(x, w, None, s, None, None, 0.0, False, cfg)


DOT_CONFIGS = [  # gemv.int8_gemm_dot (tensor cores, split over K)
    dict(BLOCK_N=n, BLOCK_K=k, SPLITS=sp, num_warps=4, num_stages=s)
    for n, k, sp, s in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (1, 3))
]


def best_of(run, configs, check):
    """(GB/s-ready ms, config) of the fastest config whose output passes check."""
    results = []
    for cfg in configs:
        if not check(run(cfg)):
            print(f"  wrong: {cfg}")
            continue
        results.append((do_bench(lambda: run(cfg), warmup=10, rep=40, return_mode="median"), cfg))  # noqa: B023
    return min(results, key=lambda r: r[0])


def rows_main(rows: int):
    """GB/s of int8 weight at `rows` activation rows: what Int8Linear runs today, the tensor-core
    kernel at its best tile sizes, and bf16 cuBLAS reading twice the bytes. (A CUDA-core kernel
    reading each weight tile once for all rows lost to both at 2-16 rows: BENCHMARKS.md.)"""
    import quantize

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {rows} rows")
    print("| shape | N x K | today | dot kernel | best dot config | bf16 cuBLAS |")
    print("|---|---|---|---|---|---|")
    for name, (N, K) in SHAPES.items():
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        s = torch.rand(N, device="cuda") / 100
        ref = gemv.int8_gemv_reference(x, w, s).float()

        def close(y):
            return ((y.float() - ref).norm() / ref.norm()).item() < 1e-2  # noqa: B023

        linear = quantize.Int8Linear(K, N, device="cuda")
        linear.weight.copy_(w)
        linear.scales.copy_(s)
        today = do_bench(lambda: linear(x), warmup=10, rep=40, return_mode="median")  # noqa: B023
        dot_ms, dot_cfg = best_of(lambda cfg: gemv.int8_gemm_dot(x, w, s, **cfg), DOT_CONFIGS, close)  # noqa: B023
        wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        bf16_ms = do_bench(lambda: torch.nn.functional.linear(x, wb), warmup=10, rep=40, return_mode="median")  # noqa: B023
        gbs = lambda ms, nbytes=N * K: f"{nbytes / ms / 1e6:.0f}"  # noqa: E731, B023
        print(f"| {name} | {N} x {K} | {gbs(today)} | {gbs(dot_ms)} | {dot_cfg} | {gbs(bf16_ms, 2 * N * K)} |")


def main():
    if "--rows" in sys.argv:
        return rows_main(int(sys.argv[sys.argv.index("--rows") + 1]))
    configs = CONFIGS + [c for c in WIDE_CONFIGS if c not in CONFIGS] if "--wide" in sys.argv else CONFIGS
    if "--convert" in sys.argv:
        configs = CONVERT_CONFIGS + [gemv.int8_gemv_config(n, k) for n, k in SHAPES.values()]
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | N x K | default GB/s | best GB/s | best config | bf16 cuBLAS GB/s |")
    print("|---|---|---|---|---|---|")
    for name, (N, K) in SHAPES.items():
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        s = torch.rand(N, device="cuda") / 100
        nbytes = N * K + N * 4 + K * 2 + N * 2
        ref = gemv.int8_gemv_reference(x, w, s)
        results = []
        for cfg in configs:
            y = launch(x, w, s, cfg)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err < 1e-2:
                print(f"  {name} {cfg}: wrong (rel err {err})")
                continue
            ms = do_bench(lambda: launch(x, w, s, cfg), warmup=10, rep=40, return_mode="median")  # noqa: B023 - run here
            results.append((nbytes / ms / 1e6, cfg))
        default = gemv.int8_gemv_config(N, K)
        default_gbs = next(g for g, c in results if c == default)
        best_gbs, best = max(results, key=lambda r: r[0])
        wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ms_bf16 = do_bench(lambda: torch.nn.functional.linear(x, wb), warmup=10, rep=40, return_mode="median")  # noqa: B023
        print(f"| {name} | {N} x {K} | {default_gbs:.0f} | {best_gbs:.0f} | {best} | {N * K * 2 / ms_bf16 / 1e6:.0f} |")
        top = sorted(results, key=lambda r: -r[0])[:5]
        print("  top 5: " + "; ".join(f"{g:.0f} {c}" for g, c in top))
        if "--convert" in sys.argv:
            for conv in (0, 1, 2):
                g, c = max((r for r in results if r[1].get("CONVERT", gemv.INT8_CONVERT) == conv), key=lambda r: r[0])
                print(f"  CONVERT={conv}: best {g:.0f} GB/s {c}")


if __name__ == "__main__":
    main()
