"""The MoE experts' down projection + routing-weighted sum at decode: Inductor against one Triton kernel.

    python scripts/moe_down_sweep.py                  # one GPU, ~1 min: Qwen3-30B-A3B shapes, 1 and 8 tokens
    python scripts/moe_down_sweep.py --tokens 2,4,16  # other token counts
    python scripts/moe_down_sweep.py --gate-up --tokens 4,8,16   # the experts' gate/up instead (below)

Qwen3-30B-A3B's decode profile (H200, 2026-12-03, BENCHMARKS.md) has the down projection fused by
Inductor with the weighted sum, the residual and the next RMSNorm in one kernel that reads the
chosen experts at 1.25 TB/s (gate/up reads at 2.78). This times, each replayed in a CUDA graph:
  inductor         the model's code (model.matvec over the gathered w2, weighted sum), compiled
  inductor+norm    the same plus the residual add and the next RMSNorm, compiled as one graph
                   (what the model's step gets)
  kernel default   gemv.expert_down_mix with gemv.expert_down_config's tile (what the model runs)
  kernel           the same over a grid of tiles (each checked against the reference), best shown
  kernel+norm      the best tile, then the residual and RMSNorm compiled after it
Bytes = the chosen experts' w2 rows read per token (k x D x I x 2 per token).

The model runs the kernel (gemv.DownMixExperts) from gemv.EXPERT_DOWN_MIN_TOKENS tokens up: these
numbers chose that threshold and the tile.

--gate-up times the step before it, SiLU(gate) * up of the chosen experts: Inductor's gathered
reduction (Experts.hidden, compiled) against gemv.expert_gate_up (grouped by expert, the default
from 2 to 16 tokens), at its default tile and over GATE_UP_TILES. GB/s there counts the distinct
chosen experts' w13 (what a grouped read must move).
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

import gemv  # noqa: E402
from gemv import expert_down_mix, expert_down_mix_reference  # noqa: E402
from model import RMSNorm, matvec, weighted_sum  # noqa: E402

E, D, INTER, K_ACTIVE = 128, 2048, 768, 8  # Qwen3-30B-A3B
DEVICE = "cuda"  # (a dry run under Triton's interpreter sets "cpu")
TILES = [
    dict(BLOCK_D=d, BLOCK_I=i, num_warps=w, num_stages=s)
    for d, i, w, s in itertools.product((2, 4, 8, 16), (128, 256, 512), (2, 4, 8), (1, 3))
    if d * i // (32 * w) <= 128  # fp32 accumulators per thread
]


def best_tile(label, tiles, config_name, run, right):
    """The fastest of `tiles` for run(), each set as gemv.<config_name> (the tile the kernel launches
    with) and checked with right(output) first; a tile that fails or runs out of resources is skipped."""
    best = None
    for cfg in tiles:
        setattr(gemv, config_name, lambda tokens, cfg=cfg: cfg)
        try:
            if not right(run()):
                print(f"{cfg}: wrong output", flush=True)
                continue
            ms = do_bench_cudagraph(run, rep=30)
        except Exception as e:  # noqa: BLE001 - out of resources: skip the tile
            print(f"{cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        print(f"{label} {cfg}: {ms * 1e3:.1f} us", flush=True)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best[1]


GATE_UP_TILES = [
    dict(BLOCK_I=i, BLOCK_D=d, num_warps=w, num_stages=s)
    for i, d, w, s in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3))
]


def inductor_gate_up(x, ids, w13):
    gate, up = matvec(w13[ids], x.unsqueeze(1)).chunk(2, dim=-1)  # Experts.hidden
    return torch.nn.functional.silu(gate) * up


def measure_gate_up(n, w13, rows):
    """Inductor's gathered gate/up against the grouped kernel at n tokens; appends rows."""
    x = torch.randn(n, D, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device=DEVICE)[:K_ACTIVE] for _ in range(n)])
    nbytes = ids.unique().numel() * 2 * INTER * D * 2
    want = inductor_gate_up(x.float(), ids, w13.float())

    def timed(name, fn):
        ms = do_bench_cudagraph(fn, rep=50)
        rows.append((n, name, ms * 1e3, nbytes / ms / 1e6))
        print(f"{n} tokens, {name}: {ms * 1e3:.1f} us", flush=True)

    def close(got):
        return ((got.float() - want).norm() / want.norm()).item() < 2e-2

    compiled = torch.compile(inductor_gate_up, fullgraph=True)
    assert close(compiled(x, ids, w13))
    timed("inductor gate/up", lambda: compiled(x, ids, w13))
    assert close(gemv.expert_gate_up(x, ids, w13))
    timed("gate/up kernel default", lambda: gemv.expert_gate_up(x, ids, w13))
    default = gemv.expert_gate_up_config
    best = best_tile(f"{n} tokens, gate/up kernel", GATE_UP_TILES, "expert_gate_up_config",
                     lambda: gemv.expert_gate_up(x, ids, w13), close)  # fmt: skip
    gemv.expert_gate_up_config = lambda tokens: best
    timed(f"gate/up kernel {best}", lambda: gemv.expert_gate_up(x, ids, w13))
    gemv.expert_gate_up_config = default


def inductor_down_mix(h, ids, mix, w2):
    return weighted_sum(matvec(w2[ids], h), mix)  # Experts.mixed after the hidden activations


def measure(n, w2, norm, rows):
    """Every variant at n tokens; appends (tokens, what, us, GB/s) to rows."""
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
    default = gemv.expert_down_config
    assert (expert_down_mix(h, ids, mix, w2).float() - want).abs().max() < 2e-2
    timed("kernel default", lambda: expert_down_mix(h, ids, mix, w2))
    best = best_tile(f"{n} tokens, kernel", TILES, "expert_down_config", lambda: expert_down_mix(h, ids, mix, w2),
                     lambda got: (got.float() - want).abs().max().item() <= 2e-2)  # fmt: skip
    gemv.expert_down_config = lambda tokens: best
    timed(f"kernel {best}", lambda: expert_down_mix(h, ids, mix, w2))
    after = torch.compile(lambda: norm(residual + expert_down_mix(h, ids, mix, w2)), fullgraph=True)
    after()
    timed("kernel+norm (best tile)", after)
    gemv.expert_down_config = default


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--gate-up", action="store_true", help="time the experts' gate/up instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.gate_up:
        w13 = torch.randn(E, 2 * INTER, D, device=DEVICE, dtype=torch.bfloat16) * 0.02
        for n in (int(t) for t in args.tokens.split(",")):
            measure_gate_up(n, w13, rows)
    else:
        w2 = torch.randn(E, D, INTER, device="cuda", dtype=torch.bfloat16) * 0.02
        norm = RMSNorm(D).to("cuda", torch.bfloat16)
        for n in (int(t) for t in args.tokens.split(",")):
            measure(n, w2, norm, rows)
    what = "distinct chosen experts' w13" if args.gate_up else "chosen w2"
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; E={E} D={D} I={INTER} k={K_ACTIVE}, bf16")
    print(f"| tokens | what | us | GB/s of {what} |")
    print("|---|---|---|---|")
    for n, name, us, gbs in rows:
        print(f"| {n} | {name} | {us:.1f} | {gbs:.0f} |")


if __name__ == "__main__":
    main()
