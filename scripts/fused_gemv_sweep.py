"""The fused batch-1 decode block's GEMV calls (gemv.DecodeBlock), one shape at a time: what each
fold costs, and which launch tile is best for it.

    python scripts/fused_gemv_sweep.py                  # one GPU, ~3-4 min
    python scripts/fused_gemv_sweep.py --shapes smol-w13 --tiles 2x1024x4
    TRITON_INTERPRET=1 python scripts/fused_gemv_sweep.py --device cpu --shapes smol-wo --iters 1   # a smoke run

Why (issue 11): on an H200 the fused block won at SmolLM2-135M (0.763 -> 0.693 ms a step) and
int8 Llama-3-8B, and lost at bf16 Llama-3-8B (4.144 -> 4.833 ms), where SiLU(gate) * up was then
folded into w2's loads. That fold moved to w13's stores (each sigmoid computed once); the RMSNorm
still folds into wqkv's and w13's loads (x and the norm weight re-read by every program). Per shape
this prints, in us per call (GB/s of weight):

  cuBLAS         F.linear with nothing folded in (what a layer without gemv.py would run; the output head's today)
  plain          the GEMV with nothing folded in, at gemv.decode_gemv_tiles' tile (DecodeLinear's call)
  folded         DecodeBlock's call (the folds below), at its default tile (half the outputs a
                 program with SiLU(gate) * up: as many weight rows)
  folded, best   the fastest of --tiles for the folded call, and its tile (rows/K step/warps)

Folds: wqkv and w13 take the norm, w13 also SiLU(gate) * up of its halves (N outputs from 2N rows),
wo and w2 the residual. The Qwen3-30B-A3B rows are one token's 8 of 128 experts (decode_gemv_experts):
gate/up with the norm and SiLU(gate) * up, then down. Each call reads another weight copy (or
another 8 experts), all captured in one CUDA graph and replayed, as the decode step runs.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import time_cycled  # noqa: E402

import gemv  # noqa: E402

# name: (weight rows, K, folds); experts: (E, k) chosen of E. Rows are the weight's: w13's outputs are half.
SHAPES = {
    "smol-wqkv": (960, 576, dict(norm=True)),
    "smol-wo": (576, 576, dict(residual=True)),
    "smol-w13": (3072, 576, dict(norm=True, glu=True)),
    "smol-w2": (576, 1536, dict(residual=True)),
    "llama-wqkv": (6144, 4096, dict(norm=True)),
    "llama-wo": (4096, 4096, dict(residual=True)),
    "llama-w13": (28672, 4096, dict(norm=True, glu=True)),
    "llama-w2": (4096, 14336, dict(residual=True)),
    "qwen3-wqkv": (5120, 2048, dict(norm=True)),
    "qwen3-wo": (2048, 4096, dict(residual=True)),
    "qwen3-experts-w13": (1536, 2048, dict(norm=True, glu=True, experts=(128, 8))),
    "qwen3-experts-w2": (2048, 768, dict(experts=(128, 8))),
    # the output heads with the final RMSNorm folded in: SmolLM2's tied [49152, 576] is cuBLAS's today (F.linear after
    # the norm; 21.4 us of a 0.394 ms step on an H100, 2026-12-07), Llama-3-8B's untied one DecodeLinear's (plain)
    "smol-head": (49152, 576, dict(norm=True)),
    "llama-head": (128256, 4096, dict(norm=True)),
}
DEFAULT_TILES = ",".join(f"{n}x{k}x{w}" for n, k, w in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (2, 4, 8)))
L2_BYTES = 64 * 2**20  # more than an H100's / H200's 50 MB


def launch(x, w, ids, norm_weight, residual, folds, tile):
    """DecodeBlock's call (gemv._decode_gemv_launch, what decode_gemv and decode_gemv_experts run)
    with this tile's BLOCK_N outputs a program (2 x BLOCK_N weight rows with glu)."""
    eps = 1e-5 if norm_weight is not None else 0.0
    return gemv._decode_gemv_launch(x, w, ids, None, norm_weight, residual, eps, bool(folds.get("glu")), tile)


def shape_row(name, tiles, device, dtype, iters) -> list[str]:
    rows, K, folds = SHAPES[name]
    experts = folds.get("experts")
    torch.manual_seed(0)
    if experts:  # one weight of E experts; each call another 8 of them, so L2 holds none
        E, k = experts
        weights = [torch.randn(E, rows, K, device=device, dtype=dtype) / 30]
        copies = E // k
        id_sets = [torch.arange(i * k, (i + 1) * k, device=device) for i in range(copies)]
        nbytes = k * rows * K * dtype.itemsize
    else:
        nbytes = rows * K * dtype.itemsize
        copies = max(2, min(64, -(-L2_BYTES // nbytes)))
        weights = [torch.randn(rows, K, device=device, dtype=dtype) / 30 for _ in range(copies)]
        id_sets = [None] * copies
    x = torch.randn(1, K, device=device, dtype=dtype)
    norm_weight = torch.rand(K, device=device, dtype=dtype) + 0.5 if folds.get("norm") else None
    n_out = rows // 2 if folds.get("glu") else rows
    residual = torch.randn(1, n_out, device=device, dtype=dtype) if folds.get("residual") else None
    weight_of = (lambda i: weights[0]) if experts else (lambda i: weights[i])

    def want():
        extra = dict(norm_weight=norm_weight, eps=1e-5 if norm_weight is not None else 0.0, glu=bool(folds.get("glu")))
        if experts:
            return gemv.decode_gemv_experts_reference(x, id_sets[0], weights[0], **extra).float()
        return gemv.decode_gemv_reference(x, weights[0], residual=residual, **extra).float()

    reference = want()

    def run(tile, folded):
        args = (norm_weight, residual, folds) if folded else (None, None, {})
        got = launch(x, weight_of(0), id_sets[0], *args, tile).float()
        if folded and (got - reference).norm() / reference.norm() > 1e-2:
            return None  # a wrong result is never a row
        seconds = time_cycled(lambda i: launch(x, weight_of(i), id_sets[i], *args, tile), copies, device, iters)
        return seconds, us_and_rate(seconds)

    def us_and_rate(seconds):
        return f"{seconds * 1e6:.2f} ({nbytes / seconds / 1e9:.0f})"

    def cublas():  # F.linear on the unfolded x (cuBLAS on a GPU)
        if experts:
            return "-"
        return us_and_rate(time_cycled(lambda i: F.linear(x, weight_of(i)), copies, device, iters))

    def tile_of(glu):  # what gemv._decode_gemv_launch launches
        cfg = gemv.decode_gemv_tiles(rows, K, False, glu)
        return {key: cfg[key] for key in ("BLOCK_N", "BLOCK_K", "num_warps")}

    default = tile_of(bool(folds.get("glu")))
    plain, folded = run(tile_of(False), False), run(default, True)
    best = None
    for tile in tiles:
        if tile["BLOCK_K"] > max(256, 1 << (K - 1).bit_length()):
            continue
        result = run(tile, True)
        if result is not None and (best is None or result[0] < best[0][0]):
            best = (result, tile)
    tile_name = "-" if best is None else f"{best[1]['BLOCK_N']}/{best[1]['BLOCK_K']}/{best[1]['num_warps']}w"
    default_name = f"{default['BLOCK_N']}/{default['BLOCK_K']}/{default['num_warps']}w"
    return [
        name,
        f"{n_out} x {K}" + (f", {experts[1]} of {experts[0]}" if experts else ""),
        "+".join(f for f in ("norm", "glu", "residual") if folds.get(f)) or "-",
        default_name,
        cublas(),
        plain[1],
        "wrong" if folded is None else folded[1],
        "-" if best is None else f"{best[0][1]} {tile_name}",
    ]


def parse_tiles(text: str) -> list[dict]:
    tiles = []
    for item in text.split(","):
        n, k, w = (int(v) for v in item.split("x"))
        tiles.append(dict(BLOCK_N=n, BLOCK_K=k, num_warps=w))
    return tiles


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--tiles", default=DEFAULT_TILES, help="outputs a program x K step x warps, comma-separated")
    p.add_argument("--iters", type=int, default=20, help="graph replays timed")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]!r}; use some of {', '.join(SHAPES)}")
        return 2
    try:
        tiles = parse_tiles(args.tiles)
    except ValueError:
        print(f"error: --tiles {args.tiles!r}: write each as ROWSxKSTEPxWARPS, e.g. 2x1024x4")
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}, {dtype}; us per call (GB/s of weight), batch 1")
    print("| shape | outputs x K | folds | default tile | cuBLAS | plain | folded | folded, best tile |")
    print("|---|---|---|---|---|---|---|---|")
    for name in shapes:
        print("| " + " | ".join(shape_row(name, tiles, device, dtype, args.iters)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
