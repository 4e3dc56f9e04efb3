"""Where a compiled decode step's time goes: each CUDA kernel's time per step, grouped by name.

    python scripts/profile_decode.py --model llama-3-8b --weights int8          # one GPU, ~1.5 min
    python scripts/profile_decode.py --model smollm2-135m --kv-dtype int8 --top 30
    python scripts/profile_decode.py --device cpu --model smollm2-135m --no-compile   # CPU: ops' self time

Random weights at the named shape (scripts/bench_ours.build_model), the decode step compiled as
generate.py --compile does (one CUDA graph per step), a warm-up generate() that compiles it,
then a few replays under the torch profiler. Prints the step time (CUDA events, no profiler),
generate()'s rate beside its steady step (the median gap between tokens reaching the host), the
loop without token reads and with each part of them, the sum of kernel times, and the kernels by
total time per step: the table to put beside each kernel's bytes before deciding what to fuse or tune.
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from bench_common import kernel_times, random_prompts, sync, time_loop  # noqa: E402
from bench_ours import build_model, kv_dtype_for, named_args  # noqa: E402

import kv_attention  # noqa: E402
from generate import Generator, Sampling, model_weight_bytes  # noqa: E402

NAME_CHARS = 90


def parse_tile(text: str) -> tuple:
    """'1536,2048,glu=4/1024/4' -> ((1536, 2048, True), {BLOCK_N: 4, BLOCK_K: 1024, num_warps: 4})."""
    try:
        shape, tile = text.split("=")
        rows, k, *glu = shape.split(",")
        outputs, block_k, warps = (int(v) for v in tile.split("/"))
        if glu not in ([], ["glu"]):
            raise ValueError
        return (int(rows), int(k), glu == ["glu"]), dict(BLOCK_N=outputs, BLOCK_K=block_k, num_warps=warps)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want ROWS,K[,glu]=OUTPUTS/BLOCK_K/WARPS, e.g. 1536,2048,glu=4/1024/4"
        ) from None


def use_tiles(tiles: dict) -> None:
    """gemv's float GEMV launches these tiles for these weight shapes (the rest keep theirs)."""
    import gemv

    default = gemv.decode_gemv_tiles

    def decode_gemv_tiles(n, k, int8, glu):
        return {**default(n, k, int8, glu), **({} if int8 else tiles.get((n, k, glu), {}))}

    gemv.decode_gemv_tiles = decode_gemv_tiles


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--weights", default="bf16", help="bf16, int8, int4-g64, ...")
    p.add_argument("--kv-dtype", default="bf16", help="bf16, int8, fp8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=16, help="filled context before decode")
    p.add_argument("--cache", type=int, default=0, help="cache slots (default: ctx + new tokens)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="profiled decode steps")
    p.add_argument("--top", type=int, default=20)
    p.add_argument(
        "--by-launch", action="store_true", help="a kernel's launches of another grid / block size on rows of their own"
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="the eager (CUDA-graph) step")
    p.add_argument(
        "--compile-blocks", action="store_true", help="each block compiled alone, the step eager (generate.py's flag)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--layers", type=int, default=0, help="the named shape with this many layers (a per-layer A/B, compiled fast)"
    )
    p.add_argument(
        "--flex-decode-options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="Inductor flex-decoding kernel options at decode, e.g. '{\"SPLIT_KV\": 1}' (model.flex_decode_options)",
    )
    p.add_argument(
        "--tile",
        action="append",
        default=[],
        type=parse_tile,
        metavar="ROWS,K[,glu]=OUTPUTS/BLOCK_K/WARPS",
        help="the batch-1 float GEMV's launch for a [ROWS, K] weight (glu: w13's, SiLU(gate) * up of its halves) "
        "in place of gemv.decode_gemv_tiles' (repeatable): a tile's A/B in the whole step, where programmatic "
        "dependent launch makes the next kernel wait for the slowest program (fused_gemv_sweep.py times calls alone)",
    )
    args = p.parse_args(argv)
    if args.tile:
        use_tiles(dict(args.tile))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # generate.py's defaults
    model = build_model(args.model, args.weights, device, dtype, named_args(args.model, args.layers))
    model.flex_decode_options = args.flex_decode_options
    gen = Generator(model, compile=args.compile and not args.compile_blocks, compile_blocks=args.compile_blocks)
    slots = args.cache or args.ctx + args.new_tokens
    gen.setup(args.batch, slots, kv_dtype_for(args.kv_dtype, dtype))
    prompts = random_prompts(args.batch, args.ctx, model.args.vocab_size).tolist()
    warm = gen.generate(prompts, args.new_tokens, Sampling())  # compiles
    res = gen.generate(prompts, args.new_tokens, Sampling())
    # generate() again, each token's arrival on the host timed: the median gap between arrivals is generate()'s
    # step once its loop runs steadily (on CUDA the reads are one step behind); what decode_s holds beyond that
    # many steps at that gap is spent where the loop starts and ends
    arrivals = []

    def arrived(row, token_id):  # row 0's only: a step's rows reach the host together
        if row == 0:
            arrivals.append(time.perf_counter())

    timed = gen.generate(prompts, args.new_tokens, Sampling(), on_token=arrived)
    step_gaps = [(b - a) * 1e3 for a, b in zip(arrivals[1:], arrivals[2:])]  # ms, from the first decoded token on
    gaps = sorted(step_gaps)
    steady_ms = gaps[len(gaps) // 2] if gaps else float("nan")
    token = torch.zeros(args.batch, 1, dtype=torch.long, device=device)
    input_pos = torch.tensor([args.ctx], device=device)
    sampling = Sampling()

    def step():
        # on a GPU each call copies token and position into the CUDA graph's input buffers (the step advances
        # its own copies), so every replay decodes at slot ctx: generate()'s loop hands the buffers back
        # instead. On the CPU the step moves input_pos on one slot a call (16 calls by default)
        return gen.decode_fn(model, token, input_pos, sampling)

    def decode_loop(copy: bool = False, wait: bool = False):
        # generate()'s decode loop (the step's buffers handed back, the position moving on from ctx over the new
        # tokens' slots) with none or a part of its token reads (generate.DeviceTokenReader): each step's token
        # copied into pinned memory (copy), an event recorded after each step and the host waiting on the one two
        # steps back (wait). generate() minus the loop without reads is what the reads cost (the twenty-seventh
        # session's H100: 8-11 us of each steady step); that loop minus the replayed step, the context's growth
        t, pos, events = token.clone(), torch.tensor([args.ctx], device=device), []
        for s in range(1, args.new_tokens):
            t, pos = gen.decode_fn(model, t, pos, sampling)
            if copy:
                pinned[s].copy_(t.view(-1), non_blocking=True)
            if wait:
                events.append(torch.cuda.Event())
                events[-1].record()
                if s >= 2:
                    events[s - 2].synchronize()

    def loop_step_ms(**reads) -> float:
        return time_loop(functools.partial(decode_loop, **reads), device, 3) * 1e3 / max(1, args.new_tokens - 1)

    loop_ms = loop_step_ms()
    read_forms = {}
    if device.type == "cuda":
        pinned = torch.empty((args.new_tokens, args.batch), dtype=torch.long, pin_memory=True)
        for name, copy, wait in (("copies", True, False), ("event waits", False, True), ("both", True, True)):
            read_forms[name] = loop_step_ms(copy=copy, wait=wait)

    for _ in range(3):
        step()
    sync(device)
    replay_ms = time_loop(step, device, 50 if device.type == "cuda" else 3) * 1e3

    steps = args.steps
    table = kernel_times(step, steps, device, by_launch=args.by_launch)
    kernel_us = sum(us for _, us in table.values()) / steps
    calls = sum(c for c, _ in table.values()) / steps
    weight_gb = model_weight_bytes(model) / 1e9
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{where}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}: {args.model} "
        f"layers={model.args.n_layers} w={args.weights} "
        f"kv={args.kv_dtype} B={args.batch} ctx={args.ctx} slots={slots} "
        f"compile={'blocks' if args.compile_blocks else args.compile} "
        f"flex decode options={args.flex_decode_options}" + "".join(f" tile {t}" for t in args.tile)
    )
    print(
        f"generate(): {res.decode_steps * args.batch / res.decode_s:.1f} tok/s "
        f"({res.decode_s / res.decode_steps * 1e3:.3f} ms a step, first step {warm.first_decode_s:.1f} s); "
        f"replayed step {replay_ms:.3f} ms = {weight_gb * 1e3 / replay_ms:.0f} GB/s of {weight_gb:.2f} GB weights"
    )
    print(f"generate()'s loop without its token reads: {loop_ms:.3f} ms a step")
    if read_forms:
        forms = ", ".join(f"{name} {ms:.3f}" for name, ms in read_forms.items())
        print(f"the loop with a part of the reads (ms a step): {forms}")
    fixed_ms = timed.decode_s * 1e3 - steady_ms * timed.decode_steps
    print(
        f"generate() with each token's arrival timed: {timed.decode_s / timed.decode_steps * 1e3:.3f} ms a step, "
        f"the median gap between arrivals {steady_ms:.3f} ms, so {fixed_ms:.2f} ms of its {timed.decode_s * 1e3:.2f} "
        f"beyond {timed.decode_steps} steady steps (the first step, to its sync: {timed.first_decode_s * 1e3:.2f} ms)"
    )
    if gaps:
        # where the mean step's excess over the median gap sits: a few long gaps (the host late), or none (the
        # loop's ends). The token log's H100 run (twenty-eighth session) left 1.14 ms a call there, the copies 0.12
        long_gaps = [(i, gap) for i, gap in enumerate(step_gaps) if gap > 1.5 * steady_ms]
        long_excess_ms = sum(gap - steady_ms for _, gap in long_gaps)
        print(
            f"the gaps between arrivals (ms): p10 {gaps[len(gaps) // 10]:.3f}, p90 {gaps[len(gaps) * 9 // 10]:.3f}, "
            f"max {gaps[-1]:.3f}; {len(long_gaps)} over 1.5x the median, "
            f"{long_excess_ms:.2f} ms beyond it, at gaps {[i for i, _ in long_gaps[:8]]}; "
            f"the first three {' '.join(f'{gap:.3f}' for gap in step_gaps[:3])}, "
            f"the last three {' '.join(f'{gap:.3f}' for gap in step_gaps[-3:])}"
        )
    what = "kernels" if device.type == "cuda" else "operators (self time)"
    print(f"{what} per step: {calls:.0f}, their sum {kernel_us / 1e3:.3f} ms ({kernel_us / 1e3 / replay_ms:.0%} busy)")
    if kv_attention.pdl_applies(device) or torch._inductor.config.triton.enable_pdl and device.type == "cuda":
        # a kernel launched with PDL starts before the one ahead of it ends and waits in-kernel
        print("programmatic dependent launch on: a kernel's time includes its wait for the one before it")
    print(f"| us/step | calls/step | us/call | share | {what} |")
    print("|---|---|---|---|---|")
    for name, (c, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[: args.top]:
        share = us / steps / kernel_us
        print(f"| {us / steps:.1f} | {c / steps:.0f} | {us / c:.2f} | {share:.1%} | {name[:NAME_CHARS]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
