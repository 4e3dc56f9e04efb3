"""Sweep kv_attention's split-KV decode kernel launch (tile, programs, warps, stages) and print GB/s.

    python scripts/kv_kernel_sweep.py              # one GPU, ~3 min: Llama-3-8B attention shapes
    python scripts/kv_kernel_sweep.py --quick      # the default launch and a few neighbours
    python scripts/kv_kernel_sweep.py --quick --case "int8 B8"   # one case (its first launch: the default)

Each case is one decode attention call (split kernel + merge) replayed in a CUDA graph. Bytes =
the valid K/V slots (+ their scales for int8), so GB/s compares directly with the copy bandwidth.
Every config's output is checked against kv_attention's fp32 reference before it is timed.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

import kv_attention  # noqa: E402

# (name, cache dtype, batch, cache slots, filled slots): the H200 step profiles' cases
CASES = [
    ("int8 B8 8k/8448", torch.int8, 8, 8448, 8192),
    ("bf16 B8 8k/8448", torch.bfloat16, 8, 8448, 8192),
    ("bf16 B1 8k/32768", torch.bfloat16, 1, 32768, 8192),
    ("bf16 B1 16/80", torch.bfloat16, 1, 80, 16),
]
N_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128
KV = kv_attention
DEFAULT = {  # today's launch per cache kind
    "bf16": (KV.BLOCK_N, KV.TARGET_PROGRAMS, KV.NUM_WARPS, KV.NUM_STAGES),
    "int8": (KV.BLOCK_N, KV.TARGET_PROGRAMS_QUANTIZED, KV.NUM_WARPS, KV.NUM_STAGES),
}


def configs(quick: bool, default):
    """(BLOCK_N, target programs, num_warps, num_stages); the default first."""
    if quick:
        grid = itertools.product((64, 128), (512, 1024), (4, 8), (2, 3))
    else:
        grid = itertools.product((32, 64, 128), (256, 512, 1024, 2048), (4, 8), (2, 3, 4))
    return [default] + [c for c in grid if c != default]


def make_case(dtype, batch, slots, filled):
    torch.manual_seed(0)
    q = torch.randn(batch, N_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    shape = (batch, N_KV_HEADS, slots, HEAD_DIM)
    if dtype == torch.int8:
        k = torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8)
        v = torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8)
        k_scale = (torch.rand(*shape[:3], 1, device="cuda") * 0.02).to(torch.bfloat16)
        v_scale = (torch.rand(*shape[:3], 1, device="cuda") * 0.02).to(torch.bfloat16)
        nbytes = 2 * batch * N_KV_HEADS * filled * (HEAD_DIM + 2)
    else:
        k = torch.randn(shape, device="cuda", dtype=dtype)
        v = torch.randn(shape, device="cuda", dtype=dtype)
        k_scale = v_scale = None
        nbytes = 2 * batch * N_KV_HEADS * filled * HEAD_DIM * k.element_size()
    row_start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    q_slot = torch.tensor([filled - 1], device="cuda")
    ref = kv_attention.quantized_decode_attention_reference(q, k, k_scale, v, v_scale, row_start, q_slot, 0)
    if k_scale is None:
        run = lambda: kv_attention.decode_attention(q, k, v, row_start, q_slot, 0)  # noqa: E731
    else:
        run = lambda: kv_attention.quantized_decode_attention(q, k, k_scale, v, v_scale, row_start, q_slot, 0)  # noqa: E731
    return run, ref, nbytes


def set_launch(cfg):
    KV.BLOCK_N, programs, KV.NUM_WARPS, KV.NUM_STAGES = cfg
    KV.TARGET_PROGRAMS = KV.TARGET_PROGRAMS_QUANTIZED = programs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-budget-s", type=float, default=400)
    ap.add_argument("--case", default="", help="only the cases whose name contains this (e.g. 'int8 B8')")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for name, dtype, batch, slots, filled in CASES:
        if args.case not in name:
            continue
        run, ref, nbytes = make_case(dtype, batch, slots, filled)
        default = DEFAULT["int8" if dtype == torch.int8 else "bf16"]
        results = []
        for cfg in configs(args.quick, default):
            if time.time() - t0 > args.time_budget_s:
                print(f"time budget reached at {name} {cfg}", flush=True)
                break
            set_launch(cfg)
            try:
                err = (run().float() - ref.float()).abs().max().item()
                if err > 3e-2:
                    print(f"{name} {cfg}: wrong output (max err {err:.3g})", flush=True)
                    continue
                ms = do_bench_cudagraph(run, rep=30)
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the config
                print(f"{name} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            results.append((ms, cfg))
            print(f"{name} {cfg}: {ms * 1e3:.1f} us {nbytes / ms / 1e6:.0f} GB/s", flush=True)
        if not results:
            continue
        default_ms = next((ms for ms, cfg in results if cfg == default), float("nan"))
        best_ms, best = min(results)
        rows.append((name, nbytes, default_ms, best_ms, best))
    print("\n| case | valid MB | default us | GB/s | best us | GB/s | best (BLOCK_N, target programs, warps, stages) |")
    print("|---|---|---|---|---|---|---|")
    for name, nbytes, default_ms, best_ms, best in rows:
        print(
            f"| {name} | {nbytes / 1e6:.1f} | {default_ms * 1e3:.1f} | {nbytes / default_ms / 1e6:.0f} "
            f"| {best_ms * 1e3:.1f} | {nbytes / best_ms / 1e6:.0f} | {best} |"
        )


if __name__ == "__main__":
    main()
