"""Sweep gemv.int4_gemv's tiles on the Llama-3-8B projections at batch 1, beside tinygemm, and print GB/s.

    python scripts/int4_gemv_sweep.py                 # one GPU, ~2-3 minutes (each config compiles once per group size)
    python scripts/int4_gemv_sweep.py --quick         # the default tiles only

Each kernel alone, L2 flushed between calls (triton's do_bench), each config checked against tinygemm
(_weight_int4pack_mm, on the same packed weight) before it is timed. GB/s = int4 bytes + scales and
zeros. gemv.int4_gemv_config picks from this.
"""

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import gemv  # noqa: E402
import quantize  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
CONFIGS = [
    dict(BLOCK_N=n, SUPERTILES=st, num_warps=w, num_stages=2)
    for n, st, w in itertools.product((8, 16, 32), (1, 2, 4, 8), (1, 2, 4))
]


def launch(x, weight, groupsize, scales_and_zeros, cfg):
    """gemv.int4_gemv with the tiles of cfg."""
    K, N = x.shape[1], scales_and_zeros.shape[1]
    inner_k_tiles = 2 * weight.shape[3]
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    even = (K // (16 * inner_k_tiles)) % cfg["SUPERTILES"] == 0
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    gemv._int4_gemv_kernel[grid](
        x,
        weight,
        scales_and_zeros,
        y,
        N,
        K,
        GROUP=groupsize,
        IKT=inner_k_tiles,
        EVEN=even,
        EVEN_N=N % cfg["BLOCK_N"] == 0,
        ASM=True,
        **cfg,
    )
    return y


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | N x K | group | tinygemm GB/s | int4_gemv default GB/s | best GB/s | best config |")
    print("|---|---|---|---|---|---|---|")
    for (name, (N, K)), groupsize in itertools.product(SHAPES.items(), (64, 128)):
        linear = quantize.Int4Linear(K, N, groupsize=groupsize, device="cuda")
        linear.weight, linear.scales_and_zeros = quantize.quantize_int4(
            torch.randn(N, K, device="cuda") / 30, groupsize
        )
        linear.pack_()
        w, sz = linear.weight, linear.scales_and_zeros
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        nbytes = N * K // 2 + sz.numel() * 2
        ref = torch.ops.aten._weight_int4pack_mm(x, w, groupsize, sz).float()
        tinygemm = do_bench(lambda: torch.ops.aten._weight_int4pack_mm(x, w, groupsize, sz), return_mode="median")  # noqa: B023
        default = gemv.int4_gemv_config(N, K, 2 * w.shape[3])
        configs = [default] if "--quick" in sys.argv else [default] + [c for c in CONFIGS if c != default]
        results = []
        for cfg in configs:
            err = ((launch(x, w, groupsize, sz, cfg).float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                print(f"  {name} g{groupsize} {cfg}: wrong (rel err {err:.3g})")
                continue
            ms = do_bench(lambda: launch(x, w, groupsize, sz, cfg), return_mode="median")  # noqa: B023
            results.append((nbytes / ms / 1e6, cfg))
        default_gbs = next((g for g, c in results if c == default), float("nan"))
        best_gbs, best = max(results, key=lambda r: r[0]) if results else (float("nan"), None)
        gbs = nbytes / tinygemm / 1e6
        print(f"| {name} | {N} x {K} | {groupsize} | {gbs:.0f} | {default_gbs:.0f} | {best_gbs:.0f} | {best} |")


if __name__ == "__main__":
    main()
