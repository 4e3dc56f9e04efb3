"""Speculative decoding on a GPU: what one verify step (k + 1 tokens) costs against one plain
decode step, and the end-to-end upper bound with the target's own weights as the draft.

python scripts/bench_speculative.py --out bench_out/speculative.json          # H100: about 4 minutes

Random weights at a real shape (default Llama-3-8B, bf16, batch 1), made on the device as
scripts/bench.py makes them. Per k the verify step is timed twice: compiled (what --compile runs;
each k is its own static-shape graph, so k values are compiled in the order given until the
time budget is spent) and as an eager CUDA graph (no compiler; every k). The upper bound runs
generate() with a draft that shares the target's weights, so every guess stands: its speedup is
bounded by the draft's cost, and `ideal_speedup` = (k + 1) / verify cost is what free guesses
would give. `--device cpu --model smollm2-135m --ks 1,2` checks the script on a CPU.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_common import random_prompts, time_loop  # noqa: E402
from bench_ours import build_model  # noqa: E402

from common import write_json_atomic  # noqa: E402
from generate import (  # noqa: E402
    CUDAGraphStep,
    Generator,
    Sampling,
    Speculation,
    decode_one,
    decode_rate,
    verify_step,
)
from model import Transformer  # noqa: E402

WARMUP, TIMED = 3, 30  # calls per timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="named config (default: llama-3-8b)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    p.add_argument(
        "--ks", default="1,2,4,8,3,5,6,7", help="k values, compiled in this order (default: 1,2,4,8,3,5,6,7)"
    )
    p.add_argument("--ctx", type=int, default=512, help="tokens in the cache when steps are timed (default: 512)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per end-to-end run (default: 200)")
    p.add_argument("--e2e-k", type=int, default=4, help="k of the end-to-end upper bound (default: 4)")
    p.add_argument(
        "--time-budget-s", type=float, default=170, help="stop compiling more k values after this (default: 170)"
    )
    p.add_argument("--no-compile", action="store_true", help="eager CUDA-graph steps only (default: off)")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here (default: none)")
    return p.parse_args(argv)


def alias(model: Transformer) -> Transformer:
    """A second model over the same weight tensors (no copy) with its own KV cache: a draft whose
    every guess the target accepts."""
    with torch.device("meta"):
        twin = Transformer(model.args)
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    twin.inv_freq = model.inv_freq
    twin.row_start = torch.zeros(0, dtype=torch.int32, device=model.inv_freq.device)
    return twin.eval()


@torch.no_grad()
def step_costs(model, device, ks, ctx, compile, budget_s):
    """Seconds per plain decode step and per verify step for each k (None: not measured)."""
    sampling = Sampling()
    gen = Generator(model)
    gen.setup(1, ctx + max(ks) + 2)
    gen.generate([random_prompts(1, ctx, model.args.vocab_size)[0].tolist()], 1)  # fill ctx slots
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    input_pos = torch.tensor([ctx], device=device)
    pos = torch.tensor([ctx], device=device)
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        plain = torch.compile(decode_one, mode=mode, fullgraph=True, dynamic=False)
        verify = torch.compile(verify_step, mode=mode, fullgraph=True, dynamic=False)
    else:
        plain = CUDAGraphStep(decode_one) if device.type == "cuda" else decode_one
        verify = None

    timed_calls = TIMED if device.type == "cuda" else 2  # the CPU only checks the script

    def timed(fn):
        t0 = time.perf_counter()
        for _ in range(WARMUP):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time_loop(fn, device, timed_calls), time.perf_counter() - t0

    plain_s, _ = timed(lambda: plain(model, token, input_pos, sampling))
    rows, started = [], time.perf_counter()
    for k in ks:
        guesses = torch.zeros((1, k), dtype=torch.long, device=device)
        fn = verify if verify is not None else (CUDAGraphStep(verify_step) if device.type == "cuda" else verify_step)
        if compile and time.perf_counter() - started > budget_s:
            rows.append({"k": k, "verify_s": None, "note": "not measured: time budget spent compiling"})
            continue
        verify_s, first_s = timed(lambda fn=fn, g=guesses: fn(model, token, g, pos, None, sampling))
        rows.append({"k": k, "verify_s": verify_s, "ratio": verify_s / plain_s, "compile_and_warmup_s": first_s})
        print(f"  k={k}: verify {verify_s * 1e3:.3f} ms = {verify_s / plain_s:.3f} x plain", file=sys.stderr)
    return plain_s, sorted(rows, key=lambda r: r["k"])


@torch.no_grad()
def upper_bound(model, device, k, ctx, new_tokens, compile):
    """generate() plain, then with the target's own weights as the draft (every guess stands)."""
    prompt = random_prompts(1, ctx, model.args.vocab_size)[0].tolist()
    out = {}
    for name, spec in (("plain", None), ("speculative", Speculation(k, draft=alias(model)))):
        gen = Generator(model, compile=compile, speculation=spec)
        gen.setup(1, ctx + new_tokens + k)
        gen.generate([prompt], new_tokens)  # compile and warm up
        res = gen.generate([prompt], new_tokens)
        tok_s, _ = decode_rate(res, 1)
        out[name] = {"decode_tok_s": tok_s, "tokens": res.tokens[0]}
        if res.speculation is not None:
            out[name].update(res.speculation.as_dict())
    assert out["speculative"]["tokens"] == out["plain"]["tokens"], "speculative greedy differs from plain greedy"
    for v in out.values():
        del v["tokens"]
    out["speedup"] = out["speculative"]["decode_tok_s"] / out["plain"]["decode_tok_s"]
    return out


def main(argv=None):
    opts = parse_args(argv)
    device = torch.device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ks = [int(k) for k in opts.ks.split(",")]
    torch._dynamo.config.cache_size_limit = 64  # one graph per k, and the generate() runs' own
    t0 = time.perf_counter()
    model = build_model(opts.model, "bf16", device, dtype)
    compile = not opts.no_compile
    result = {"model": opts.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result.update(torch_version=torch.__version__, ctx=opts.ctx, batch=1, dtype=str(dtype).removeprefix("torch."))
    for name, compiled in (("cuda_graph", False), ("compiled", True)) if compile else (("cuda_graph", False),):
        print(f"verify step vs plain decode step ({name}):", file=sys.stderr)
        plain_s, rows = step_costs(model, device, ks, opts.ctx, compiled, opts.time_budget_s)
        result[name] = {"plain_step_s": plain_s, "verify": rows}
    print(f"end-to-end upper bound, k={opts.e2e_k}, draft = the target's own weights:", file=sys.stderr)
    bound = upper_bound(model, device, opts.e2e_k, opts.ctx, opts.new_tokens, compile)
    costs = {r["k"]: r for r in result["compiled" if compile else "cuda_graph"]["verify"]}
    ratio = costs.get(opts.e2e_k, {}).get("ratio")
    bound["ideal_speedup"] = (opts.e2e_k + 1) / ratio if ratio else None
    result["upper_bound"] = {"k": opts.e2e_k, **bound}
    result["wall_s"] = time.perf_counter() - t0

    print(f"\n{opts.model}, batch 1, {opts.ctx} tokens in the cache, {result['device']}")
    modes = [m for m in ("cuda_graph", "compiled") if m in result]
    print("| k | " + " | ".join(f"verify / plain step ({m})" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for i, k in enumerate(sorted(ks)):
        cells = []
        for m in modes:
            r = result[m]["verify"][i]
            cells.append(f"{r['ratio']:.3f}" if r.get("ratio") else "not measured (time budget)")
        print(f"| {k} | " + " | ".join(cells) + " |")
    for m in modes:
        print(f"plain step ({m}): {result[m]['plain_step_s'] * 1e3:.3f} ms")
    ub = result["upper_bound"]
    print(
        f"upper bound k={ub['k']}: plain {ub['plain']['decode_tok_s']:.1f} tok/s, speculative "
        f"{ub['speculative']['decode_tok_s']:.1f} tok/s (acceptance {ub['speculative']['acceptance_rate']:.0%}), "
        f"speedup {ub['speedup']:.2f}x; with free guesses: "
        + (f"{ub['ideal_speedup']:.2f}x" if ub["ideal_speedup"] else "n/a")
    )
    print(f"wall time {result['wall_s']:.0f} s")
    if opts.out is not None:
        write_json_atomic(opts.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
