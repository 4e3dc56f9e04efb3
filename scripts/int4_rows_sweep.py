"""Time one linear layer per weight format at 1-16 activation rows, on the Llama-3-8B projections.

    python scripts/int4_rows_sweep.py                 # one GPU, well under a minute
    python scripts/int4_rows_sweep.py --device cpu --shapes wo --rows 1,2 --copies 1   # a smoke run

Why: at batch 8 a whole int4 step is slower than bf16's (5.94 vs 4.79 ms on the H200, BENCHMARKS.md
2026-12-04) while int4 at batch 1 is faster (3.01). This says which projections and row counts
tinygemm loses at, against bf16 F.linear and our int8 path (Int8Linear: gemv.py's kernels on a GPU),
each through the module the model runs. Each call reads a different copy of the weight (--copies) so
that the smaller weights are not served from L2. GB/s = weight bytes (+ scales) / time. On a GPU the
calls are captured in a CUDA graph and replayed, as the decode step runs them: timed eagerly, a
Triton op's ~70-100 us of Python dispatch hid its kernel (the int8 column read 120-470 GB/s in the
first H200 run, 2026-12-04, where the step reads 2.4 TB/s).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import time_cycled  # noqa: E402

import int4_mma  # noqa: E402
from quantize import (  # noqa: E402
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
)

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
# "-tinygemm": Int4Linear with int4_mma off (FASTGEN_INT4_MMA=0: tinygemm at every row count; int4_mma takes 1-8)
FORMATS = ("bf16", "int8", "int4-g64", "int4-g128", "int4-g64-tinygemm", "int4-g128-tinygemm")


def layer(fmt: str, weight: torch.Tensor):
    """(callable x -> y, bytes it reads of weights) in format fmt, from a float weight [N, K]."""
    N, K = weight.shape
    if fmt == "bf16":
        w = weight.to(torch.bfloat16)
        return (lambda x: F.linear(x, w)), w.numel() * 2
    if fmt == "int8":
        module = Int8Linear(K, N, device=weight.device)
        module.weight, module.scales = quantize_int8(weight)
        return module, N * K + N * 4
    groupsize = int(fmt.split("-")[1][1:])
    module = Int4Linear(K, N, groupsize=groupsize, device=weight.device)
    module.weight, module.scales_and_zeros = quantize_int4(weight, groupsize)
    module.pack_()
    nbytes = N * K // 2 + module.scales_and_zeros.numel() * 2
    if not fmt.endswith("-tinygemm"):
        return module, nbytes

    def with_tinygemm(x):  # the switch is read as the call is traced or captured
        enabled, int4_mma.ENABLED = int4_mma.ENABLED, False
        try:
            return module(x)
        finally:
            int4_mma.ENABLED = enabled

    return with_tinygemm, nbytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--rows", default="1,2,4,8,16", help="activation rows (batch x tokens)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)}")
    p.add_argument("--copies", type=int, default=4, help="weights cycled through, so L2 holds none")
    p.add_argument("--iters", type=int, default=0, help="timed calls (default: 40 on a GPU, 2 on the CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = [s for s in args.shapes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    for name in [s for s in shapes if s not in SHAPES] + [f for f in formats if f not in FORMATS]:
        print(f"error: unknown shape or format {name!r}; shapes: {', '.join(SHAPES)}; formats: {', '.join(FORMATS)}")
        return 2
    rows = [int(r) for r in args.rows.split(",")]
    iters = args.iters or (40 if device.type == "cuda" else 2)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}; us per call (GB/s of the weight read), {args.copies} weight copies")
    print("| shape | N x K | rows | " + " | ".join(formats) + " |")
    print("|---|---|---|" + "---|" * len(formats))
    torch.manual_seed(0)
    for name in shapes:
        N, K = SHAPES[name]
        cells = {}
        for fmt in formats:
            layers = [layer(fmt, torch.randn(N, K, device=device) * 0.02) for _ in range(args.copies)]
            for r in rows:
                x = torch.randn(r, K, device=device, dtype=torch.bfloat16)
                calls = max(iters, len(layers))  # each through the next weight copy
                reps = 3 if device.type == "cuda" else 1
                seconds = time_cycled(lambda i, ls=layers, x=x: ls[i % len(ls)][0](x), calls, device, reps)
                cells[fmt, r] = f"{seconds * 1e6:.1f} ({layers[0][1] / seconds / 1e9:.0f})"
        for r in rows:
            print(f"| {name} | {N} x {K} | {r} | " + " | ".join(cells[fmt, r] for fmt in formats) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
