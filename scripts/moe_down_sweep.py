"""The MoE experts' down projection + routing-weighted sum at decode: Inductor against one Triton kernel.

    python scripts/moe_down_sweep.py          # one GPU, ~2 min: Qwen3-30B-A3B shapes, 1 and 8 tokens

Qwen3-30B-A3B's decode profile (H200, 2026-12-03, BENCHMARKS.md) has the down projection fused by
Inductor with the weighted sum, the residual and the next RMSNorm in one kernel that reads the
chosen experts at 1.25 TB/s (gate/up reads at 2.78). This times, each replayed in a CUDA graph:
  inductor         the model's code (model.matvec over the gathered w2, weighted sum), compiled
  inductor+norm    the same plus the residual add and the next RMSNorm, compiled as one graph
                   (what the model's step gets)
  kernel           expert_down_mix over a grid of tiles (each checked against the reference)
  kernel+norm      the best tile, then the residual and RMSNorm compiled after it
Bytes = the chosen experts' w2 rows read per token (k x D x I x 2 per token).

expert_down_mix lives here, not in gemv.py, until it wins: the model does not call it. If it does
win, move it (kernel, reference, tiles) to gemv.py and call it from MoEFeedForward.forward at few
tokens with float experts, then profile the step (scripts/profile_decode.py --model qwen3-30b-a3b).
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.library import triton_op, wrap_triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from model import RMSNorm, matvec  # noqa: E402


def expert_down_mix_reference(h, expert_ids, mix, weight) -> torch.Tensor:
    """h [N, k, I] (each token's SiLU(gate) * up per chosen expert), expert_ids [N, k], mix [N, k]
    (the routing weights), weight [E, D, I] float -> [N, D] in h.dtype: sum_j mix_j (w2[e_j] @ h_j)."""
    y = (weight[expert_ids].float() @ h.float().unsqueeze(-1)).squeeze(-1)  # [N, k, D]
    return (y * mix.float().unsqueeze(-1)).sum(dim=1).to(h.dtype)


# expert_down_mix's tiles: BLOCK_D output rows of one token over the intermediate axis in BLOCK_I
# steps (768 = 3 x 256 for Qwen3-30B-A3B). Swept by measure() below.
EXPERT_DOWN_CONFIG = dict(BLOCK_D=8, BLOCK_I=256, num_warps=4, num_stages=3)


@triton.jit
def _expert_down_mix_kernel(
    h_ptr,  # [N, K_ACTIVE, I]
    ids_ptr,  # [N, K_ACTIVE]
    mix_ptr,  # [N, K_ACTIVE] fp32
    w_ptr,  # [E, D, I] float
    y_ptr,  # [N, D]
    D,
    inter,  # I, the intermediate size
    K_ACTIVE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # BLOCK_D outputs of token n, summed over its K_ACTIVE experts in one fp32 accumulator: the
    # routing weight scales h (I values) rather than each expert's output (D values)
    pid_d, n = tl.program_id(0), tl.program_id(1)
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_I)
    row_ok = rows < D
    acc = tl.zeros((BLOCK_D, BLOCK_I), dtype=tl.float32)
    for j in range(K_ACTIVE):
        e = tl.load(ids_ptr + n * K_ACTIVE + j).to(tl.int64)
        mix = tl.load(mix_ptr + n * K_ACTIVE + j)
        w_rows = w_ptr + e * D * inter + rows.to(tl.int64)[:, None] * inter
        h_row = h_ptr + (n * K_ACTIVE + j) * inter
        for i0 in range(0, inter, BLOCK_I):
            i = i0 + cols
            i_ok = i < inter
            h = tl.load(h_row + i, mask=i_ok, other=0.0).to(tl.float32) * mix
            w = tl.load(
                w_rows + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0, eviction_policy="evict_first"
            )
            acc += w.to(tl.float32) * h[None, :]
    tl.store(y_ptr + n * D + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


@triton_op("fastgen::expert_down_mix", mutates_args={})
def expert_down_mix(h: torch.Tensor, expert_ids: torch.Tensor, mix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """expert_down_mix_reference's contract: the chosen float experts' down projections and their
    routing-weighted sum in one kernel, each chosen expert read once per token. An opaque op, so
    Inductor cannot fuse it with the next RMSNorm (Qwen3-30B-A3B's fused kernel read the experts
    at 1.25 TB/s on the H200, 2026-12-03). Measured by measure() below."""
    N, k, inter = h.shape
    D = weight.shape[1]
    y = torch.empty((N, D), dtype=h.dtype, device=h.device)
    cfg = dict(EXPERT_DOWN_CONFIG)
    grid = (triton.cdiv(D, cfg["BLOCK_D"]), N)
    wrap_triton(_expert_down_mix_kernel)[grid](
        h.contiguous(), expert_ids.contiguous(), mix.float().contiguous(), weight, y, D, inter, K_ACTIVE=k, **cfg
    )
    return y


E, D, INTER, K_ACTIVE = 128, 2048, 768, 8  # Qwen3-30B-A3B
TILES = [
    dict(BLOCK_D=d, BLOCK_I=i, num_warps=w, num_stages=s)
    for d, i, w, s in itertools.product((2, 4, 8, 16), (128, 256, 512), (2, 4, 8), (1, 3))
    if d * i // (32 * w) <= 128  # fp32 accumulators per thread
]


def inductor_down_mix(h, ids, mix, w2):
    y = matvec(w2[ids], h)  # [N, k, D], as Experts.gathered
    return (y.float() * mix.unsqueeze(-1)).sum(dim=1).to(h.dtype)  # as MoEFeedForward.forward


def measure(n, w2, norm, rows):
    """Every variant at n tokens; appends (tokens, what, us, GB/s) to rows."""
    global EXPERT_DOWN_CONFIG  # the tile expert_down_mix launches with
    h = torch.randn(n, K_ACTIVE, INTER, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:K_ACTIVE] for _ in range(n)])
    mix = torch.rand(n, K_ACTIVE, device="cuda").softmax(-1)
    residual = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
    nbytes = n * K_ACTIVE * D * INTER * 2
    want = expert_down_mix_reference(h, ids, mix, w2).float()

    def timed(name, fn, rep=50):
        ms = do_bench_cudagraph(fn, rep=rep)
        rows.append((n, name, ms * 1e3, nbytes / ms / 1e6))
        print(f"{n} tokens, {name}: {ms * 1e3:.1f} us", flush=True)
        return ms

    compiled = torch.compile(inductor_down_mix, fullgraph=True)
    assert (compiled(h, ids, mix, w2).float() - want).abs().max() < 2e-2
    timed("inductor", lambda: compiled(h, ids, mix, w2))
    fused = torch.compile(lambda: norm(residual + inductor_down_mix(h, ids, mix, w2)), fullgraph=True)
    fused()
    timed("inductor+norm", fused)
    best = None
    for cfg in TILES:
        EXPERT_DOWN_CONFIG = cfg
        try:
            err = (expert_down_mix(h, ids, mix, w2).float() - want).abs().max().item()
            if err > 2e-2:
                print(f"{cfg}: wrong output (max err {err:.3g})", flush=True)
                continue
            ms = do_bench_cudagraph(lambda: expert_down_mix(h, ids, mix, w2), rep=30)
        except Exception as e:  # noqa: BLE001 - out of resources: skip the tile
            print(f"{cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        print(f"{n} tokens, kernel {cfg}: {ms * 1e3:.1f} us", flush=True)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    EXPERT_DOWN_CONFIG = best[1]
    timed(f"kernel {best[1]}", lambda: expert_down_mix(h, ids, mix, w2))
    after = torch.compile(lambda: norm(residual + expert_down_mix(h, ids, mix, w2)), fullgraph=True)
    after()
    timed("kernel+norm (best tile)", after)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    args = ap.parse_args()
    torch.manual_seed(0)
    w2 = torch.randn(E, D, INTER, device="cuda", dtype=torch.bfloat16) * 0.02
    norm = RMSNorm(D).to("cuda", torch.bfloat16)
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        measure(n, w2, norm, rows)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; E={E} D={D} I={INTER} k={K_ACTIVE}, bf16")
    print("| tokens | what | us | GB/s of chosen w2 |")
    print("|---|---|---|---|")
    for n, name, us, gbs in rows:
        print(f"| {n} | {name} | {us:.1f} | {gbs:.0f} |")


if __name__ == "__main__":
    main()
