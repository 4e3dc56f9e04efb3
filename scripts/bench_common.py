"""Measurement helpers shared by every bench module, the gpt-fast child process included.

Only torch and common.py are imported here: the gpt-fast child imports this module next to
gpt-fast's own model.py, so nothing of ours that is also called `model`, `generate` or `quantize`
may load.
"""

import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

# The repository root, appended (not put first): the gpt-fast child has gpt-fast's directory first
# on the path, so only common.py, which gpt-fast does not have, comes from here.
sys.path.append(str(Path(__file__).resolve().parent.parent))
from common import DTYPES, peak_memory_bytes  # noqa: E402, F401 - DTYPES: the bench modules' --dtype choices

WEIGHT_STD = 0.02  # random weights are N(0, WEIGHT_STD); norm weights are 1
INT_FILL_RANGE = (-128, 128)  # integer (quantized) tensors: uniform in [lo, hi), clipped to the dtype
RESULT_TAG = "BENCH_WORKER_RESULT "  # a child process prints its one JSON result line after this tag
CUDA_TIMING_ITERS, CPU_TIMING_ITERS = 20, 3
PROMPT_SEED = 1  # every implementation prefills the same random prompts
ERROR_CHARS = 160  # one-line error notes in the table
T0 = time.perf_counter()


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn, device, iters):
    """Seconds per call of fn: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def time_cycled(call, n: int, device, iters: int) -> float:
    """Seconds per call(i), i in range(n) (each i e.g. another weight copy, so L2 holds none), the
    first-call work done before: on a GPU the n calls captured once in a CUDA graph and the graph
    replayed iters times, as a decode step runs them; on the CPU the n calls looped iters times."""
    with torch.no_grad():
        for i in range(n):
            call(i)
        sync(device)
        if device.type != "cuda":
            return time_loop(lambda: [call(i) for i in range(n)], device, iters) / n
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(n):
                call(i)
        graph.replay()  # warm
        return time_loop(graph.replay, device, iters) / n


def kernel_times(fn, steps: int, device, by_launch: bool = False) -> dict:
    """{kernel name: [calls, total us]} over `steps` calls of fn: CUDA kernels on a GPU (read from
    the trace, which holds the kernels of CUDA-graph replays), operators' self time on the CPU.
    by_launch: a GPU kernel's launches with another grid or block size count apart (one Triton GEMV
    over four projections becomes four rows)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    table = defaultdict(lambda: [0, 0.0])
    if device.type != "cuda":
        for event in prof.key_averages():
            if event.self_cpu_time_total > 0:
                table[event.key] = [event.count, float(event.self_cpu_time_total)]
        return table
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            key = e["name"]
            if by_launch:
                launch = e.get("args", {})
                key = f"{key[:60]} grid={launch.get('grid', '?')} block={launch.get('block', '?')}".replace(" ", "")
            table[key][0] += 1
            table[key][1] += float(e["dur"])
    return table


def timing_iters(device):
    return CUDA_TIMING_ITERS if device.type == "cuda" else CPU_TIMING_ITERS


def copy_bandwidth(device, nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    s = time_loop(lambda: dst.copy_(src), device, timing_iters(device))
    return {"bytes": nbytes, "GBps": 2 * nbytes / s / 1e9, "method": "copy_ of a uint8 buffer, read + write bytes"}


def matmul_rate(device, n, dtype):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    s = time_loop(lambda: a @ b, device, timing_iters(device))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "TFLOPs": 2 * n**3 / s / 1e12}


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom_type) or "out of memory" in str(e).lower()


def short_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:ERROR_CHARS]


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0):
    """N(0, WEIGHT_STD) for floating tensors (norm weights 1), random values for integer (quantized) ones."""
    device = next(itertools.chain(module.parameters(), module.buffers())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            if "norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            elif t.dtype.itemsize == 1:  # fp8 tensors have no normal_; go through bf16
                t.copy_(
                    torch.empty(t.shape, device=t.device, dtype=torch.bfloat16).normal_(0, WEIGHT_STD, generator=gen)
                )
            else:
                t.normal_(0.0, WEIGHT_STD, generator=gen)
        elif t.dtype != torch.bool:
            info = torch.iinfo(t.dtype)
            lo, hi = max(info.min, INT_FILL_RANGE[0]), min(info.max + 1, INT_FILL_RANGE[1])
            t.copy_(torch.randint(lo, hi, t.shape, device=t.device, generator=gen, dtype=torch.int64).to(t.dtype))


def mean_valid_slots(ctx: int, new_tokens: int, window: int | None) -> float:
    # decode step s (1..N-1) attends to slots [0, ctx + s - 1]: ctx + s valid slots
    steps = range(1, new_tokens)
    return sum(min(ctx + s, window or ctx + s) for s in steps) / max(len(steps), 1)


def random_prompts(batch, ctx, vocab_size, low=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(low, vocab_size, (batch, ctx), generator=g)


def prefill_flops(weight_params: int, n_layers: int, q_width: int, batch: int, ctx: int) -> float:
    """Matmul FLOPs of a prefill: the weights, plus causal QK^T and PV over q_width = heads * head_dim."""
    linear = 2 * weight_params * batch * ctx
    attn = 2 * 2 * n_layers * q_width * batch * ctx * (ctx + 1) / 2
    return linear + attn


def speed_fields(batch, ctx, steps, decode_s, prefill_s, weight_bytes, kv_read_bytes, flops_prefill, device):
    """The columns every implementation's row shares, from its median decode and prefill times."""
    return dict(
        decode_tok_s=steps * batch / decode_s,
        step_ms=decode_s / steps * 1e3,
        kv_read_bytes_per_step=kv_read_bytes,
        GBps=(weight_bytes + kv_read_bytes) * steps / decode_s / 1e9,
        weights_only_GBps=weight_bytes * steps / decode_s / 1e9,
        ttft_s=prefill_s,
        prefill_tok_s=batch * ctx / prefill_s,
        prefill_TFLOPs=flops_prefill / prefill_s / 1e12,
        peak_memory_bytes=peak_memory_bytes(device),
    )


def run_child(cmd, env, cwd, timeout_s, log_failure=True) -> dict:
    """Run a child process that prints one RESULT_TAG line; its JSON, or a status and a one-line note
    (the child's stderr goes to our log on failure unless log_failure is False)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"over {timeout_s:.0f} s", "process_s": time.perf_counter() - t}
    process_s = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        if log_failure:
            log(f"child failed: {p.stderr[-2000:]}")
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "note": tail[:ERROR_CHARS], "process_s": process_s}
    return {"status": "ok", "process_s": process_s, **json.loads(lines[-1][len(RESULT_TAG) :])}


def print_result(result: dict):
    print(RESULT_TAG + json.dumps(result), flush=True)
