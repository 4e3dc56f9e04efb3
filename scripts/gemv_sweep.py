"""Sweep gemv.py's int8 and int4 GEMV tile sizes on the Llama-3-8B projections (batch 1); print GB/s.

    python scripts/gemv_sweep.py                # int8, one GPU, about a minute
    python scripts/gemv_sweep.py --int4 64      # int4 with group size 64 (or 128)

Bytes per call = quantized weight + scales (and zeros) + x + y. Beside each shape: the bf16 cuBLAS
GEMV reading the same weight in bf16 and the best config; gemv.int8_gemv_config and
gemv.int4_gemv_config pick from this.
"""

import argparse
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


INT4_CONFIGS = [
    dict(BLOCK_N=n, PAIRS=p, num_warps=w, num_stages=s)
    for n, p, w, s in itertools.product((4, 8, 16), (1, 2, 4), (4, 8), (1, 3))
]


def int8_case(N, K):
    """(launch(cfg), reference output, bytes per call, configs, the default config)."""
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    s = torch.rand(N, device="cuda") / 100
    y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)

    def launch(cfg):
        gemv._int8_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), 1)](x, w, s, y, N, K, **cfg)
        return y

    return (
        launch,
        gemv.int8_gemv_reference(x, w, s),
        N * K + N * 4 + K * 2 + N * 2,
        CONFIGS,
        gemv.int8_gemv_config(N, K),
    )


def int4_case(N, K, groupsize):
    from quantize import quantize_int4

    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w, sz = gemv.int4_gemv_layout(*quantize_int4(torch.randn(N, K, device="cuda"), groupsize), groupsize)
    y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    configs = [c for c in INT4_CONFIGS if c["PAIRS"] * groupsize <= 512]

    def launch(cfg):
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), 1)
        gemv._int4_gemv_kernel[grid](x, w, sz, y, N, K, w.shape[1] // groupsize, GROUP=groupsize, **cfg)
        return y

    nbytes = w.numel() + sz.numel() * 2 + K * 2 + N * 2
    ref = gemv.int4_gemv_reference(x, w, sz, groupsize)
    return launch, ref, nbytes, configs, gemv.int4_gemv_config(N, K, groupsize)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", type=int, metavar="GROUPSIZE", help="sweep the int4 GEMV at this group size")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'int4 g' + str(args.int4) if args.int4 else 'int8'} GEMV, batch 1")
    print("| shape | N x K | default GB/s | best GB/s | best config | bf16 cuBLAS GB/s |")
    print("|---|---|---|---|---|---|")
    for name, (N, K) in SHAPES.items():
        case = int4_case(N, K, args.int4) if args.int4 else int8_case(N, K)
        launch, ref, nbytes, configs, default = case
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        results = []
        for cfg in configs:
            y = launch(cfg)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err < 1e-2:
                print(f"  {name} {cfg}: wrong (rel err {err})")
                continue
            ms = do_bench(lambda: launch(cfg), warmup=10, rep=40, return_mode="median")  # noqa: B023 - run here
            results.append((nbytes / ms / 1e6, cfg))
        default_gbs = next(g for g, c in results if c == default)
        best_gbs, best = max(results, key=lambda r: r[0])
        wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        ms_bf16 = do_bench(lambda: torch.nn.functional.linear(x, wb), warmup=10, rep=40, return_mode="median")  # noqa: B023
        print(f"| {name} | {N} x {K} | {default_gbs:.0f} | {best_gbs:.0f} | {best} | {N * K * 2 / ms_bf16 / 1e6:.0f} |")
        top = sorted(results, key=lambda r: -r[0])[:5]
        print("  top 5: " + "; ".join(f"{g:.0f} {c}" for g, c in top))


if __name__ == "__main__":
    main()
