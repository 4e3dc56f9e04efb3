"""Start-up: where the time goes from process start until decode runs at full speed, for our
engine, in fresh processes: cold (empty TORCHINDUCTOR_CACHE_DIR), then warm (the same dir reused).

The parent runs `python scripts/bench.py --worker ...` twice; the worker (its own argument parser)
times each phase and prints one result line:
  imports     process start -> bench code running (interpreter, torch, our modules)
  build       random weights made on the device
  setup       KV cache allocation
  prefill     the first generate()'s prefill, eager (its token is the first token)
  compile     decode step 1: Dynamo + Inductor (+ Triton) compile, then one warm-up run
  capture     decode step 2: CUDA-graph trees record the graph on the second call (on the CPU:
              an ordinary step)
  replay      decode step 3: the steady-state speed, for scale
"""

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_common import DTYPES, log, print_result, random_prompts, run_child, sync
from bench_ours import build_model, kv_dtype_for
from bench_plan import Config

from generate import Generator, Sampling

ROOT = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = ROOT / "scripts" / "bench.py"
STARTUP_NEW_TOKENS = 16  # enough for the three timed decode steps; more would only add steady steps
TIMED_STEPS = ("compile_s", "capture_s", "replay_s")  # decode steps 1, 2, 3
PHASES = ("imports_s", "build_s", "setup_s", "prefill_s") + TIMED_STEPS


def time_first_calls(fn, device, n, out: list):
    """fn, but its first n calls are synchronised and timed: out gets (seconds, wall-clock end)."""

    def timed(*args):
        if len(out) >= n:
            return fn(*args)
        sync(device)
        t = time.perf_counter()
        result = fn(*args)
        sync(device)
        out.append((time.perf_counter() - t, time.time()))
        return result

    return timed


def parse_worker_args(argv):
    p = argparse.ArgumentParser(prog="bench.py --worker", description="one cold/warm start-up measurement")
    p.add_argument("--spawn-time", type=float, required=True, help="time.time() just before the parent spawned us")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default="bf16")
    p.add_argument("--kv", default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=16)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--new-tokens", type=int, default=STARTUP_NEW_TOKENS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--compile", dest="compile", action="store_true", default=True)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    return p.parse_args(argv)


def worker_main(argv) -> int:
    opts = parse_worker_args(argv)
    phases = {"imports_s": time.time() - opts.spawn_time}
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    t = time.perf_counter()
    model = build_model(opts.model, opts.weights, device, dtype)
    sync(device)
    phases["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gen = Generator(model, compile=opts.compile)
    gen.setup(opts.batch, opts.slots, kv_dtype_for(opts.kv, dtype))
    sync(device)
    phases["setup_s"] = time.perf_counter() - t
    steps = []
    gen.decode_fn = time_first_calls(gen.decode_fn, device, len(TIMED_STEPS), steps)
    prompts = random_prompts(opts.batch, opts.ctx, model.args.vocab_size).tolist()
    wall_start = time.time()
    res = gen.generate(prompts, opts.new_tokens, Sampling())
    phases["prefill_s"] = res.prefill_s
    phases.update({name: s for name, (s, _) in zip(TIMED_STEPS, steps)})
    result = dict(
        phases,
        first_call_s=time.time() - wall_start,
        to_first_token_s=wall_start + res.prefill_s - opts.spawn_time,
        to_full_speed_s=steps[1][1] - opts.spawn_time if len(steps) > 1 else None,
        cuda_graphs=device.type == "cuda" and opts.compile,
    )
    print_result(result)
    return 0


def start_times(cfg: Config, opts, slots, cache_dir, timeout_s) -> dict:
    """Cold then warm start of cfg in worker processes sharing a fresh Inductor cache dir."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    env.pop("TRITON_CACHE_DIR", None)  # Inductor then keeps Triton's cache under cache_dir too
    new_tokens = min(opts.new_tokens, STARTUP_NEW_TOKENS)
    args = [
        "--model",
        cfg.model,
        "--weights",
        cfg.weights,
        "--kv",
        cfg.kv,
        "--batch",
        str(cfg.batch),
        "--ctx",
        str(cfg.ctx),
        "--slots",
        str(slots),
        "--new-tokens",
        str(new_tokens),
        "--device",
        opts.device,
        "--dtype",
        opts.dtype,
        "--compile" if opts.compile else "--no-compile",
    ]
    out = {
        "config": asdict(cfg),
        "cache_slots": slots,
        "new_tokens": new_tokens,
        "compile": opts.compile,
        "method": "fresh process, fresh TORCHINDUCTOR_CACHE_DIR (cold), then the same command on that dir "
        "(warm); process_s = spawn to exit",
    }
    for kind in ("cold", "warm"):
        log(f"{kind} start: {cfg.label()} in a subprocess")
        cmd = [sys.executable, str(BENCH_SCRIPT), "--worker", "--spawn-time", repr(time.time()), *args]
        out[kind] = run_child(cmd, env, str(ROOT), timeout_s)
        if out[kind]["status"] != "ok":
            return out
        log(
            f"{kind} start: process {out[kind]['process_s']:.1f} s, to full speed "
            f"{out[kind]['to_full_speed_s'] or 0:.1f} s (compile {out[kind].get('compile_s') or 0:.1f} s)"
        )
    return out
