"""Where the persistent megakernel's step goes, phase by phase (megakernel.py; one GPU).

    python scripts/megakernel_phases.py --model smollm2-135m          # ~20 s
    python scripts/megakernel_phases.py --model smollm2-135m --ctx 2000

Random bf16 weights at the named shape, `ctx` slots filled by a prefill, then the kernel launched `steps`
times with its clock stamps on (megakernel.decode_layers(times=...): each program writes the GPU's
global timer when it finishes a phase and when it leaves the barrier after it). Per phase, averaged over
layers (layer 0's first phase, which has no barrier before it, and the last layer's w2, which has none
after it, are left out) and steps:
  work      from the barrier before to the slowest program's end of this phase (the phase's real length)
  spread    the slowest program's end minus the fastest's (uneven work)
  barrier   from the slowest program's end to the mean exit from the barrier (the barrier's own cost)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_ours import build_model, named_args  # noqa: E402

import megakernel  # noqa: E402

PHASES = ["norm + wqkv + RoPE + cache write", "attention (+ merge)", "wo + residual", "norm + w13", "w2 + residual"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ctx", type=int, default=16, help="filled slots before the timed steps")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=0, help="only the first N layers (default: all)")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    model = build_model(args.model, "bf16", device, torch.bfloat16, named_args(args.model, args.layers))
    model.setup_caches(1, args.ctx + args.steps + 8)
    with torch.no_grad():
        model(
            torch.randint(0, model.args.vocab_size, (1, args.ctx), device=device), torch.arange(args.ctx, device=device)
        )
    if not megakernel.use_layer_kernel(model):
        print(f"{args.model}: not a model the megakernel takes (megakernel.eligible)")
        return 2
    n_layers, programs = model.args.n_layers, model.layer_kernel_programs
    times = torch.zeros(programs, n_layers, 5, 2, dtype=torch.int64, device=device)
    x = torch.randn(1, 1, model.args.dim, device=device, dtype=torch.bfloat16)
    cos = torch.ones(1, 1, 1, model.args.head_dim, device=device, dtype=torch.bfloat16)
    sin = torch.zeros_like(cos)
    steps = []
    with torch.no_grad():
        for step in range(args.steps + 2):  # the first two: compile, warm
            input_pos = torch.tensor([args.ctx + step], device=device)
            megakernel.decode_layers(model, model.layer_kernel_table, x, cos, sin, input_pos, programs, times=times)
            torch.cuda.synchronize()
            if step >= 2:
                steps.append(times.double().cpu())
    t = torch.stack(steps)  # [steps, programs, L, 5, 2] ns
    done, left = t[..., 0], t[..., 1]
    # the barrier before each phase: the previous phase's, or the previous layer's last (phase 0)
    before = torch.cat([left[..., -1:].roll(1, dims=-2), left[..., :-1]], dim=-1).mean(dim=1)  # [steps, L, 5]
    slowest, fastest = done.max(dim=1).values, done.min(dim=1).values
    keep = torch.ones(n_layers, 5, dtype=torch.bool)
    keep[0, 0] = keep[-1, 4] = False  # no barrier before / after these
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}: {args.model}, {n_layers} layers,")
    print(f"{programs} programs, ctx {args.ctx}, {args.steps} steps")
    print("| phase | work us | spread us | barrier us |")
    print("|---|---|---|---|")
    rows = []
    for phase, name in enumerate(PHASES):
        k = keep[:, phase]
        work = (slowest[..., phase] - before[..., phase])[:, k].mean().item() / 1e3
        spread = (slowest[..., phase] - fastest[..., phase])[:, k].mean().item() / 1e3
        wait = (left[..., phase].mean(dim=1) - slowest[..., phase])[:, k].mean().item() / 1e3
        rows.append((work, wait))
        print(f"| {name} | {work:.2f} | {spread:.2f} | {wait:.2f} |")
    per_layer = sum(w + b for w, b in rows)
    print(f"a layer: {per_layer:.2f} us, x {n_layers} = {per_layer * n_layers / 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
