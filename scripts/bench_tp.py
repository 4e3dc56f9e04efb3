"""Tensor-parallel decode benchmark: random weights at a real model shape, split over the ranks
that torchrun starts (tp.py), against the same benchmark on one GPU.

    python scripts/bench.py --tp 1,2 --models llama-3-8b --out-dir $OUT/bench_tp       # NCCL
    python scripts/bench.py --tp 1,2 --tp-all-reduce nccl,symm-mem --models llama-3-8b
    python scripts/bench.py --tp 2 --models llama-3-70b --weights int8                 # 2x H100
    python scripts/bench.py --tp 2 --models llama-3-70b --weights bf16                 # 2x H200

bench.py --tp runs this file once per (world size, all-reduce) under
`python -m torch.distributed.run --standalone --nproc-per-node N` and prints one table. One
worker run by hand (what bench.py launches):

    torchrun --standalone --nproc-per-node 2 scripts/bench_tp.py --model llama-3-8b --json r.json

Every rank builds only its own slice (meta model of the rank's ModelArgs -> to_empty on its GPU
-> random fill), so a 70B shape needs no file and no host copy. Each configuration: prefill a
random `ctx`-token prompt, decode `new_tokens` (compiled, one CUDA graph per rank); one warm-up
call, then `runs` timed calls, median reported. All-reduce time per step is measured two ways:
a standalone CUDA graph of 2 * n_layers all-reduces of one decode step's activation
[batch, 1, dim] (what the step issues), and the profiler's sum of all-reduce kernel time inside
the compiled step's replays (which includes waiting for the slower rank).

--all-reduce symm-mem lowers the compiled step's all-reduces to PyTorch's symmetric-memory
one-shot all-reduce (tp.use_symmetric_memory_all_reduce); NVLink multicast stays off
(NCCL_NVLS_ENABLE=0 is set for every run).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench_common import copy_bandwidth, random_prompts  # noqa: E402
from bench_ours import build_model, kv_dtype_for, quant_config  # noqa: E402
from bench_plan import parse_size, split  # noqa: E402

import tp  # noqa: E402
from checkpoint import model_args_from_name  # noqa: E402
from generate import Generator, Sampling, model_weight_bytes  # noqa: E402

ALL_REDUCES = ("nccl", "symm-mem")
WORKER_TIMEOUT_S = 580


def build_rank_model(name, weights, device, dtype):
    """This rank's slice of `name` with random weights, made on its device (no file)."""
    args = model_args_from_name(name)
    shard = tp.shard_for_this_rank()
    local_args = shard.local_args(args, quant_config(weights)) if shard else args
    model = build_model(name, weights, device, dtype, local_args)  # same seed on every rank: replicas agree
    if shard:
        shard.add_all_reduces(model)
    return model, args


def time_standalone_all_reduces(shape, dtype, device, count, mode, iters=20) -> float | None:
    """ms for `count` back-to-back all-reduces of `shape`, recorded once as a CUDA graph and replayed."""
    import torch.distributed as dist

    if tp.world_size() == 1 or device.type != "cuda":
        return None
    if mode == "symm-mem":
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(shape, dtype=dtype, device=device).zero_()
        symm_mem.rendezvous(buf, dist.group.WORLD.group_name)

        out = torch.empty_like(buf)  # not in place: the peers read `buf` while the sum is written

        def step():
            for _ in range(count):
                torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", dist.group.WORLD.group_name, out)
    else:
        buf = torch.zeros(shape, dtype=dtype, device=device)

        def step():
            for _ in range(count):
                dist.all_reduce(buf)

    step()  # warm-up outside the capture (communicator set-up)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def profiled_all_reduce_ms(gen, model, batch, pos, device, steps=5) -> dict:
    """Per decode step: all-reduce kernel time and all kernel time, from the profiler over replays."""
    sampling = Sampling()
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    input_pos = torch.tensor([pos], device=device)
    for _ in range(3):
        gen.decode_fn(model, token, input_pos, sampling)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            gen.decode_fn(model, token, input_pos, sampling)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    reduce = [e for e in kernels if "allreduce" in e["name"].lower().replace("_", "")]
    return {
        "kernel_ms_per_step": sum(float(e["dur"]) for e in kernels) / 1e3 / steps,
        "all_reduce_kernel_ms_per_step": sum(float(e["dur"]) for e in reduce) / 1e3 / steps,
        "all_reduce_kernels_per_step": len(reduce) / steps,
    }


@torch.no_grad()
def worker(opts) -> int:
    device = tp.maybe_init(torch.device(opts.device))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dtype]
    if opts.all_reduce == "symm-mem":
        tp.use_symmetric_memory_all_reduce()
    model, args = build_rank_model(opts.model, opts.weights, device, dtype)
    gen = Generator(model, compile=opts.compile)
    slots = opts.ctx + opts.new_tokens
    gen.setup(opts.batch, slots, kv_dtype_for(opts.kv, dtype))
    torch.manual_seed(0)
    prompts = random_prompts(opts.batch, opts.ctx, args.vocab_size).tolist()  # the same on every rank
    t = time.perf_counter()
    gen.generate(prompts, opts.new_tokens, Sampling())
    warmup_s = time.perf_counter() - t
    runs = [gen.generate(prompts, opts.new_tokens, Sampling()) for _ in range(opts.runs)]
    tp.report_ranks(runs[-1].tokens)  # the ranks agree
    decode_s = statistics.median(r.decode_s for r in runs)
    steps = opts.new_tokens - 1
    step_ms = decode_s / steps * 1e3
    weight_bytes = model_weight_bytes(model)  # this rank's
    row = {
        "model": opts.model,
        "weights": opts.weights,
        "dtype": opts.dtype,
        "batch": opts.batch,
        "ctx": opts.ctx,
        "new_tokens": opts.new_tokens,
        "world_size": tp.world_size(),
        "all_reduce": "-" if tp.world_size() == 1 else "gloo" if device.type == "cpu" else opts.all_reduce,
        "compile": opts.compile,
        "decode_tok_s": steps * opts.batch / decode_s,
        "step_ms": step_ms,
        "warmup_s": warmup_s,
        "weight_bytes_per_rank": weight_bytes,
        "GBps_per_rank": weight_bytes / (step_ms / 1e3) / 1e9,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
    }
    if device.type == "cuda":
        copy = copy_bandwidth(device, 1 << 30)["GBps"]
        row["copy_GBps_per_gpu"] = copy
        row["fraction_of_copy_bandwidth"] = row["GBps_per_rank"] / copy  # each rank reads its own share
        row["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        count = 2 * args.n_layers
        try:
            ms = time_standalone_all_reduces((opts.batch, 1, args.dim), dtype, device, count, opts.all_reduce)
            row["standalone_all_reduce_ms_per_step"] = ms
        except Exception as e:  # noqa: BLE001 - keep the speed numbers
            row["standalone_all_reduce_ms_per_step"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        if opts.compile and tp.world_size() > 1:
            try:
                row.update(profiled_all_reduce_ms(gen, model, opts.batch, opts.ctx, device))
            except Exception as e:  # noqa: BLE001
                row["profile"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    row["peak_host_memory_bytes_per_rank"] = tp.gather(tp.peak_host_memory_bytes())
    if tp.is_rank0():
        print(json.dumps(row), flush=True)
        if opts.json:
            Path(opts.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- bench.py --tp


def tp_main(opts) -> int:
    """bench.py --tp N[,M]: one torchrun per (world size, all-reduce), then one table."""
    explicit = opts.explicit
    models = opts.models if "models" in explicit else "llama-3-8b"
    weights = opts.weights if "weights" in explicit else "bf16"
    rows = []
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in models.split(","):
        for w in weights.split(","):
            for n in [int(x) for x in str(opts.tp).split(",")]:
                for mode in opts.tp_all_reduce.split(",") if n > 1 else ["nccl"]:
                    if mode not in ALL_REDUCES:
                        print(f"error: --tp-all-reduce {mode!r}; use {' or '.join(ALL_REDUCES)}", file=sys.stderr)
                        return 2
                    path = out_dir / f"tp_{model}_{w}_tp{n}_{mode}.json"
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                    cmd += [str(Path(__file__).resolve()), "--model", model, "--weights", w, "--json", str(path)]
                    cmd += ["--dtype", opts.dtype, "--all-reduce", mode, "--device", opts.device]
                    cmd += ["--batch", split(opts.batch)[0], "--ctx", str(parse_size(split(opts.ctx)[0]))]
                    cmd += ["--new-tokens", str(opts.new_tokens), "--runs", str(opts.runs)]
                    cmd += [] if opts.compile else ["--no-compile"]
                    print(" ".join(cmd), file=sys.stderr, flush=True)
                    env = dict(os.environ, NCCL_NVLS_ENABLE="0")  # no NVLink multicast on these machines
                    try:
                        proc = subprocess.run(cmd, env=env, timeout=WORKER_TIMEOUT_S)
                        ok = proc.returncode == 0 and path.is_file()
                    except subprocess.TimeoutExpired:
                        ok = False
                    row = json.loads(path.read_text()) if ok else {"model": model, "weights": w, "world_size": n}
                    row.setdefault("all_reduce", mode if n > 1 else "-")
                    row["status"] = "ok" if ok else "failed"
                    rows.append(row)
    print(tp_table(rows), flush=True)
    (out_dir / "tp_latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def tp_table(rows) -> str:
    head = "model | weights | TP | all-reduce | tok/s | speed-up | step ms | all-reduce ms/step standalone"
    head += " | all-reduce kernels ms/step | GB/rank | % copy BW/GPU | peak host GB/rank"
    lines = [f"| {head} |", "|" + "---|" * (head.count("|") + 1)]
    base = {(r["model"], r["weights"]): r["decode_tok_s"] for r in rows if r.get("world_size") == 1}

    def num(v, fmt, scale=1):
        return format(v * scale, fmt) if isinstance(v, (int, float)) else (v or "-")

    for r in rows:
        cells = [r["model"], r["weights"], r["world_size"], r["all_reduce"]]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(map(str, cells + ["failed"] + ["-"] * 7)) + " |")
            continue
        b = base.get((r["model"], r["weights"]))
        cells += [
            num(r["decode_tok_s"], ".1f"),
            f"{r['decode_tok_s'] / b:.2f}x" if b else "-",
            num(r["step_ms"], ".2f"),
            num(r.get("standalone_all_reduce_ms_per_step"), ".3f"),
            num(r.get("all_reduce_kernel_ms_per_step"), ".3f"),
            num(r["weight_bytes_per_rank"], ".2f", 1e-9),
            num(r.get("fraction_of_copy_bandwidth"), ".0f", 100),
            ", ".join(f"{x / 1e9:.1f}" for x in r["peak_host_memory_bytes_per_rank"]),
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def parse_worker_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--weights", default="bf16", help="bf16, int8 or int4-g<groupsize>")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--kv", default="bf16", help="KV cache dtype: bf16, int8 or fp8")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--all-reduce", choices=ALL_REDUCES, default="nccl")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(worker(parse_worker_args()))
