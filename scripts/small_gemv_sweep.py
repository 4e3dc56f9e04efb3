"""Batch-1 float linears on a GPU: cuBLAS against a Triton GEMV and Inductor's own reduction, with
and without the RMSNorm before them, at SmolLM2-135M's and Llama-3-8B's shapes.

    python scripts/small_gemv_sweep.py                    # one GPU, ~2 min
    python scripts/small_gemv_sweep.py --device cpu --shapes smol-wo --copies 2 --no-compile   # a smoke run

Why (issue 11): SmolLM2-135M's compiled step is launch-bound, 0.945 ms for 364 kernels on the H200,
and its four cuBLAS GEMVs a layer take 3.7-3.9 us each for 0.7-3.5 MB of weight (~300 GB/s): the
weight read is a small part of each. Before a fused decode path (norm in the GEMV's prologue, SiLU *
up in w2's, the residual in the epilogue) is worth writing, this says what one GEMV costs each way:

  cublas         F.linear (what the compiled step runs today)
  triton         gemv.decode_gemv's kernel (what DecodeLinear runs), nothing folded in, the fastest of
                 its launch tiles (each checked against F.linear). The H200 run in BENCHMARKS.md
                 (f4a06e7) timed gemv.py's int8 GEMV kernel over the bf16 weight with unit scales:
                 the same loop with a scale multiply more.
  inductor       torch.compile of (x * w).sum(-1): Inductor's own reduction kernel
  norm+cublas    torch.compile of F.linear(rms_norm(x)): the norm kernel, then cuBLAS
  norm+inductor  torch.compile of (rms_norm(x) * w).sum(-1): can Inductor fuse the two?

Each call reads another copy of the weight (--copies, so L2 holds none), all of them captured in one
CUDA graph and replayed, as the decode step runs; us = the graph's time / calls.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import time_cycled  # noqa: E402

SHAPES = {  # name: (N, K), the model's own [out, in]
    "smol-wqkv": (960, 576),
    "smol-wo": (576, 576),
    "smol-w13": (3072, 576),
    "smol-w2": (576, 1536),
    "llama-wqkv": (6144, 4096),
    "llama-wo": (4096, 4096),
    "llama-w13": (28672, 4096),
    "llama-w2": (4096, 14336),
}
TRITON_TILES = [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w) for n, k, w in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4))
]
L2_BYTES = 64 * 2**20  # more than an H100's / H200's 50 MB: the copies cycled fill it


def rms_norm(x, weight, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def triton_gemv(x, w, tiles):
    """gemv.decode_gemv's kernel (what DecodeLinear runs) with these tiles, nothing folded in."""
    import gemv

    return gemv._decode_gemv_launch(x, w, None, None, None, None, 0.0, False, tiles)


COLUMNS = ["copies", "cublas", "triton (best tile)", "inductor", "norm+cublas", "norm+inductor"]


def shape_row(name, copies, device, dtype, iters, compile_variants) -> dict:
    """{column: cell} for one shape: us per call (GB/s of weight)."""
    N, K = SHAPES[name]
    nbytes = N * K * torch.finfo(dtype).bits // 8
    copies = copies or max(2, min(64, -(-L2_BYTES // nbytes)))
    weights = [torch.randn(N, K, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    gamma = torch.rand(K, device=device, dtype=dtype) + 0.5
    x = torch.randn(1, K, device=device, dtype=dtype)
    want = F.linear(x, weights[0]).float()

    def timed(call):
        seconds = time_cycled(call, copies, device, iters)
        return seconds, f"{seconds * 1e6:.2f} ({nbytes / seconds / 1e9:.0f})"

    cells = {"copies": str(copies), "cublas": timed(lambda i: F.linear(x, weights[i]))[1]}
    cells.update({c: "-" for c in COLUMNS[2:]})
    if device.type == "cuda":
        best = None
        for tiles in TRITON_TILES:
            if tiles["BLOCK_K"] > max(256, 1 << (K - 1).bit_length()):
                continue
            got = triton_gemv(x, weights[0], tiles).float()
            if (got - want).norm() / want.norm() > 1e-2:
                print(f"  wrong: {name} {tiles}")
                continue
            result = timed(lambda i, t=tiles: triton_gemv(x, weights[i], t))
            if best is None or result[0] < best[0][0]:
                best = (result, tiles)
        (_, cell), tiles = best
        cells["triton (best tile)"] = f"{cell} {tiles['BLOCK_N']}/{tiles['BLOCK_K']}/{tiles['num_warps']}w"
    if compile_variants:
        variants = {
            "inductor": lambda x, g, w: (x.float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype),
            "norm+cublas": lambda x, g, w: F.linear(rms_norm(x, g), w),
            "norm+inductor": lambda x, g, w: (rms_norm(x, g).float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype),
        }
        for column, fn in variants.items():
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            if column == "inductor":
                got = compiled(x, gamma, weights[0]).float()
                assert (got - want).norm() / want.norm() < 1e-2, column
            cells[column] = timed(lambda i, f=compiled: f(x, gamma, weights[i]))[1]
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument(
        "--copies", type=int, default=0, help="weights cycled through (default: enough to overflow L2, <= 64)"
    )
    p.add_argument("--iters", type=int, default=0, help="graph replays timed (default 20 on a GPU, 2 on the CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = [s for s in args.shapes.split(",") if s]
    for name in shapes:
        if name not in SHAPES:
            print(f"error: unknown shape {name!r}; use some of {', '.join(SHAPES)}")
            return 2
    iters = args.iters or (20 if device.type == "cuda" else 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}, {dtype}; us per call (GB/s of weight), batch 1")
    print("| shape | N x K | copies | " + " | ".join(COLUMNS[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(COLUMNS) - 1))
    torch.manual_seed(0)
    for name in shapes:
        cells = shape_row(name, args.copies, device, dtype, iters, not args.no_compile)
        print(f"| {name} | {' x '.join(map(str, SHAPES[name]))} | " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
