"""Benchmark decode and prefill speed on random weights at real model shapes, side by side with
Hugging Face transformers generate() (static cache + torch.compile).

    python scripts/bench.py --suite quick                       # one H100, under 10 minutes
    python scripts/bench.py --suite full --models llama-3-8b --batch 1   # the grid, one slice at a time
    python scripts/bench.py --device cpu --models smollm2-135m --suite smoke   # CPU smoke test
    python scripts/bench.py --merge bench_out/a.json bench_out/b.json      # one table + plot from slices

Weights are N(0, 0.02) (norm weights 1), made on the device from a meta-device model: no file.
Each configuration: prefill a random prompt of `ctx` tokens, then decode --new-tokens; one
warm-up call (it compiles), then --runs timed calls; medians are reported.

What the columns mean
  tok/s    decode tokens/s over all rows: (new_tokens - 1) * batch / decode time
  GB/s     (weight bytes + KV bytes read) per step * steps / decode time. Weight bytes follow
           gpt-fast (embedding table excluded unless tied); KV bytes = valid slots * Hkv * D * 2
           * bytes * layers * batch, averaged over the decode steps (window-capped for Mistral).
  %copy    GB/s as a fraction of a device-to-device copy_ measured in this run (read + write bytes)
  pf tok/s prefill tokens/s (batch * ctx / time to first token); pf %mm = prefill FLOP/s over the
           bf16 8192^3 matmul rate measured in this run
  TTFT     time to first token (prefill + first sample, on the host)
  1st s    the warm-up call's first decode step: compile + CUDA-graph capture when a new shape
           compiles, "-" when the shape was already compiled
  HF rows  decode time = median generate(N) - median generate(1) (the static cache keeps one size
           across calls, so both run the same compiled graphs); TTFT = median generate(1)
Cold / warm start: the headline configuration in a fresh subprocess with an empty
TORCHINDUCTOR_CACHE_DIR (cold), then the same command again on that cache dir (warm).
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from generate import KV_CACHE_DTYPES, Generator, Sampling, model_weight_bytes  # noqa: E402
from model import ModelArgs, Transformer, rope_inv_freq  # noqa: E402

ALL_MODELS = ["llama-3-8b", "llama-2-7b", "llama-3.2-1b", "mistral-7b-v0.1", "qwen2.5-7b", "smollm2-135m"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WORKER_TAG = "BENCH_WORKER_RESULT "
T0 = time.perf_counter()


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configurations

@dataclass
class Config:
    model: str
    weights: str = "bf16"  # bf16 (unquantized, in --dtype), int8, int4-g<groupsize>
    kv: str = "bf16"  # KV cache dtype name (generate.KV_CACHE_DTYPES)
    batch: int = 1
    ctx: int = 16  # filled context: prompt tokens prefilled before decode
    cache: int | str = "just"  # allocated slots, or "just" = ctx + new tokens
    kernel_profile: bool = False  # sum of CUDA kernel times per decode step (SmolLM2)
    beyond_context: bool = False  # allow cache slots past the model's trained context

    def cache_slots(self, new_tokens: int) -> int:
        return self.ctx + new_tokens if self.cache == "just" else int(self.cache)

    def label(self):
        return f"{self.model} w={self.weights} kv={self.kv} B={self.batch} ctx={self.ctx} cache={self.cache}"


def parse_size(s: str) -> int | str:
    s = s.strip().lower()
    if s in ("just", "just-enough"):
        return "just"
    if s.endswith("k"):
        return int(float(s[:-1]) * 1024)
    return int(s)


def fmt_size(n) -> str:
    if n == "just":
        return "just"
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


SUITES = {
    # defaults for the flags; "plan" is an explicit list of configurations (quick) instead of a grid
    "smoke": dict(models="smollm2-135m", batch="1", ctx="16", cache="just", new_tokens=8, runs=1, compile=False,
                  hf=False, weights="bf16", kv_dtypes="bf16", time_budget_s=0),
    "quick": dict(models="llama-3-8b,smollm2-135m", batch="1", ctx="16", cache="just", new_tokens=200, runs=3,
                  compile=True, hf=True, weights="bf16", kv_dtypes="bf16", time_budget_s=560),
    "full": dict(models=",".join(ALL_MODELS), batch="1,8,32", ctx="16,2k,8k", cache="just,32k,128k",
                 new_tokens=200, runs=3, compile=True, hf=True, weights="bf16,int8,int4-g64",
                 kv_dtypes="bf16,int8,fp8", time_budget_s=570),
}


def quick_plan(models: list[str], weights: list[str], kv_dtypes: list[str]) -> list[Config]:
    """Highest value first: the time budget drops whatever is left at the end. The headline model
    is the first non-SmolLM2 one (llama-3-8b by default); a 32k cache may pass its trained context
    (the anchors measure Llama-3-8B with 32768 slots too: with random weights the speed is the same)."""
    big = next((m for m in models if m != "smollm2-135m"), None)
    plan = []
    if big is not None:
        plan.append(Config(big))
        plan += [Config(big, weights=w) for w in weights if w != "bf16"]
        plan += [Config(big, kv=k) for k in kv_dtypes if k != "bf16"]
        plan += [Config(big, cache=32768, beyond_context=True),
                 Config(big, ctx=8192, cache=32768, beyond_context=True)]
    if "smollm2-135m" in models:
        plan.append(Config("smollm2-135m", kernel_profile=True))
    if big is not None:
        plan.append(Config(big, batch=8))
    return plan


def grid(models, weights, kv_dtypes, batches, ctxs, caches, beyond_context) -> list[Config]:
    # Grouped so that configurations sharing a compiled decode shape (model, weights, kv, batch,
    # cache slots) run back to back: the decode step compiles once per shape.
    out = []
    for m in models:
        for w in weights:
            for kv in kv_dtypes:
                for b in batches:
                    for cache in caches:
                        for ctx in ctxs:
                            out.append(Config(m, w, kv, b, ctx, cache, kernel_profile=(m == "smollm2-135m" and b == 1
                                                                                       and ctx == ctxs[0]),
                                              beyond_context=beyond_context))
    return out


# ----------------------------------------------------------------------------- device measurements

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


def copy_bandwidth(device, nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    s = time_loop(lambda: dst.copy_(src), device, 20 if device.type == "cuda" else 5)
    del src, dst
    return {"bytes": nbytes, "GBps": 2 * nbytes / s / 1e9, "method": "copy_ of a uint8 buffer, read + write bytes"}


def matmul_rate(device, n, dtype):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    s = time_loop(lambda: a @ b, device, 20 if device.type == "cuda" else 3)
    del a, b
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "TFLOPs": 2 * n ** 3 / s / 1e12}


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process-wide on the CPU


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom_type) or "out of memory" in str(e).lower()


def short_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:160]


# ----------------------------------------------------------------------------- models

@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0):
    """N(0, 0.02) for floating tensors (norm weights 1), random values for integer (quantized) ones."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            if "norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            elif t.dtype.itemsize == 1:  # fp8 tensors have no normal_; go through bf16
                t.copy_(torch.empty(t.shape, device=t.device, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen))
            else:
                t.normal_(0.0, 0.02, generator=gen)
        elif t.dtype != torch.bool:
            info = torch.iinfo(t.dtype)
            lo, hi = max(info.min, -128), min(info.max, 127) + 1
            t.copy_(torch.randint(lo, hi, t.shape, device=t.device, generator=gen, dtype=torch.int64).to(t.dtype))


def quant_config(weights: str) -> dict | None:
    if weights in ("bf16", "none"):
        return None
    if weights == "int8":
        return {"mode": "int8"}
    if weights.startswith("int4"):
        return {"mode": "int4", "groupsize": int(weights.partition("-g")[2] or 128)}
    raise ValueError(f"unknown weight mode {weights!r}; use bf16, int8 or int4-g<groupsize>")


def build_model(name: str, weights: str, device, dtype) -> Transformer:
    """Random weights at the real shapes, made on the device: meta model -> (quantize) -> to_empty -> fill."""
    args = ModelArgs.from_name(name)
    qcfg = quant_config(weights)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        if qcfg is not None:
            from quantize import apply_quantization  # ImportError: skipped by the caller with a note
            apply_quantization(model, qcfg, device)
    model.to_empty(device=device)
    fill_random_(model)
    for module in model.modules():  # int4: random nibbles -> the kernel's tile layout for this device
        if hasattr(module, "pack_"):
            module.pack_()
    # non-persistent buffers that to_empty left uninitialised
    model.inv_freq = rope_inv_freq(args).to(device)
    model.row_start = torch.zeros(0, dtype=torch.int32, device=device)
    return model.eval()


def kv_bytes_per_slot(model: Transformer) -> int:
    """Bytes of KV cache per slot, over all rows and layers (scales included for quantized caches)."""
    total = 0
    for layer in model.layers:
        total += sum(b.numel() * b.element_size() for b in layer.attention.kv_cache.buffers())
    return total // model.cache_len


def mean_valid_slots(ctx: int, new_tokens: int, window: int | None) -> float:
    # decode step s (1..N-1) attends to slots [0, ctx + s - 1]: ctx + s valid slots
    steps = range(1, new_tokens)
    return sum(min(ctx + s, window or ctx + s) for s in steps) / max(len(steps), 1)


def prefill_flops(args: ModelArgs, weight_params: int, batch: int, ctx: int) -> float:
    linear = 2 * weight_params * batch * ctx
    attn = 2 * 2 * args.n_layers * args.n_heads * args.head_dim * batch * ctx * (ctx + 1) / 2  # causal QK^T and PV
    return linear + attn


# ----------------------------------------------------------------------------- our generator

@torch.no_grad()  # as in generate(): a grad-mode change would recompile the step
def kernel_profile(gen: Generator, model, batch, pos, device, steps=5):
    """Sum of CUDA kernel durations per decode step over a few CUDA-graph replays."""
    sampling = Sampling()
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    input_pos = torch.tensor([pos], device=device)
    for _ in range(3):
        gen.decode_fn(model, token, input_pos, sampling)
    sync(device)
    replay_s = time_loop(lambda: gen.decode_fn(model, token, input_pos, sampling), device, 20)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            gen.decode_fn(model, token, input_pos, sampling)
        sync(device)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    out = {"replay_step_ms": replay_s * 1e3, "profiled_steps": steps, "kernels_per_step": len(kernels) / steps}
    if kernels:
        out["kernel_sum_ms_per_step"] = sum(float(e["dur"]) for e in kernels) / 1e3 / steps
        out["gpu_busy_fraction"] = out["kernel_sum_ms_per_step"] / out["replay_step_ms"]
    else:
        out["note"] = "the profiler recorded no kernels inside the CUDA-graph replays"
    return out


class OursRunner:
    """Keeps one model (per model/weights) and one compiled decode shape (per batch/cache) alive."""

    def __init__(self, opts, device, dtype):
        self.opts, self.device, self.dtype = opts, device, dtype
        self.model = self.model_key = None
        self.gen = self.shape_key = None

    def release(self):
        self.gen = self.shape_key = None
        self.model = self.model_key = None
        if self.opts.compile:
            torch._dynamo.reset()
        free_memory(self.device)

    def run(self, cfg: Config, row: dict):
        opts, device = self.opts, self.device
        N = opts.new_tokens
        slots = cfg.cache_slots(N)
        if self.model_key != (cfg.model, cfg.weights):
            self.release()
            log(f"building {cfg.model} ({cfg.weights}) on {device}")
            t = time.perf_counter()
            self.model = build_model(cfg.model, cfg.weights, device, self.dtype)
            self.model_key = (cfg.model, cfg.weights)
            log(f"built in {time.perf_counter() - t:.1f} s")
        model = self.model
        args = model.args
        kv_dtype = KV_CACHE_DTYPES[cfg.kv] if cfg.kv != "bf16" else self.dtype
        shape_key = (cfg.batch, slots, cfg.kv)
        new_shape = shape_key != self.shape_key
        if new_shape:
            self.gen = self.shape_key = None
            if opts.compile:
                torch._dynamo.reset()  # one static compile per shape, never an automatic-dynamic one
            for layer in model.layers:  # drop the old cache before allocating the new one
                layer.attention.kv_cache = None
            free_memory(device)
            self.gen = Generator(model, compile=opts.compile)
            self.gen.setup(cfg.batch, slots, kv_dtype)
            self.shape_key = shape_key
        gen = self.gen
        weight_bytes = model_weight_bytes(model)
        weight_params = sum(p.numel() for n, p in model.named_parameters()
                            if not (n.startswith("tok_embeddings.") and not args.tie_embeddings))
        slot_bytes = kv_bytes_per_slot(model)
        row.update(cache_slots=slots, cache_alloc=model.cache_len, weight_bytes=weight_bytes,
                   kv_bytes_per_slot=slot_bytes)
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, args.vocab_size, (cfg.batch, cfg.ctx), generator=g).tolist()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log(f"warm-up {cfg.label()}" + (" (compiles)" if new_shape and opts.compile else ""))
        t = time.perf_counter()
        warm = gen.generate(prompts, N, Sampling())
        row["warmup_s"] = time.perf_counter() - t
        row["first_step_s"] = warm.first_decode_s if new_shape else None
        runs = []
        for i in range(opts.runs):
            res = gen.generate(prompts, N, Sampling())
            assert res.decode_steps == N - 1, (res.decode_steps, N)
            runs.append(res)
            log(f"  run {i + 1}/{opts.runs}: {res.decode_steps * cfg.batch / res.decode_s:.1f} tok/s, "
                f"TTFT {res.prefill_s * 1e3:.1f} ms")
        decode_s = statistics.median(r.decode_s for r in runs)
        prefill_s = statistics.median(r.prefill_s for r in runs)
        steps = N - 1
        kv_read = slot_bytes * mean_valid_slots(cfg.ctx, N, args.sliding_window)
        row.update(
            status="ok", decode_tok_s=steps * cfg.batch / decode_s, step_ms=decode_s / steps * 1e3,
            decode_s_runs=[r.decode_s for r in runs], prefill_s_runs=[r.prefill_s for r in runs],
            kv_read_bytes_per_step=kv_read, GBps=(weight_bytes + kv_read) * steps / decode_s / 1e9,
            weights_only_GBps=weight_bytes * steps / decode_s / 1e9,
            ttft_s=prefill_s, prefill_tok_s=cfg.batch * cfg.ctx / prefill_s,
            prefill_TFLOPs=prefill_flops(args, weight_params, cfg.batch, cfg.ctx) / prefill_s / 1e12,
            peak_memory_bytes=peak_memory(device))
        if cfg.kernel_profile:
            if device.type == "cuda" and opts.compile:
                log(f"kernel profile {cfg.model}")
                try:
                    row["kernel_profile"] = kernel_profile(gen, model, cfg.batch, cfg.ctx, device)
                    row["kernel_profile"]["step_ms"] = row["step_ms"]
                except Exception as e:  # noqa: BLE001 - keep the speed numbers of this row
                    traceback.print_exc(file=sys.stderr)
                    row["kernel_profile"] = {"note": f"failed: {short_error(e)}"}
            else:
                row["kernel_profile"] = {"note": "needs CUDA and --compile (it profiles CUDA-graph replays)"}


# ----------------------------------------------------------------------------- Hugging Face

def hf_config(args: ModelArgs, dtype):
    import transformers

    if args.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": args.rope_base}
    else:
        rope = {**{k: v for k, v in args.rope_scaling.items() if k != "type"},
                "rope_type": args.rope_scaling["type"], "rope_theta": args.rope_base}
    common = dict(hidden_size=args.dim, intermediate_size=args.intermediate_size, num_hidden_layers=args.n_layers,
                  num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                  vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_parameters=rope,
                  max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=args.tie_embeddings,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if args.qk_norm:
        cfg = transformers.Qwen3Config(**common)
    elif args.qkv_bias:
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
    elif args.sliding_window is not None:
        cfg = transformers.MistralConfig(**common, sliding_window=args.sliding_window)
    else:
        cfg = transformers.LlamaConfig(**common)
    return cfg


def build_hf(name, device, dtype):
    import transformers

    args = ModelArgs.from_name(name)
    cfg = hf_config(args, dtype)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf.to_empty(device=device)  # this unties tied embeddings: tie them again
    if args.tie_embeddings:
        hf.tie_weights()
        assert hf.lm_head.weight is hf.model.embed_tokens.weight, "HF embeddings did not tie again"
    fill_random_(hf)
    # RoPE frequencies are non-persistent buffers computed at init: make them again on the device
    rotary = hf.model.rotary_emb
    with torch.device(device):  # the constructor's signature varies across versions; config always works
        hf.model.rotary_emb = type(rotary)(config=hf.config).to(device)
    other = [n for n, _ in hf.named_buffers() if not n.startswith("model.rotary_emb.")]
    if other:
        log(f"warning: HF buffers left uninitialised: {other[:3]}")
    return hf.eval(), args


def run_hf(cfg: Config, opts, device, dtype, row):
    import transformers

    row["transformers"] = transformers.__version__
    hf, args = build_hf(cfg.model, device, dtype)
    row["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    hf.generation_config.cache_implementation = "static"
    if opts.compile:
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    N = opts.new_tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab_size, (cfg.batch, cfg.ctx), generator=g).to(device)
    mask = torch.ones_like(ids)

    def call(n):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        assert out.shape[1] == cfg.ctx + n, out.shape
        return time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"HF warm-up {cfg.label()}" + (" (compiles)" if opts.compile else ""))
    row["first_call_s"] = call(N)  # sizes the static cache for N; generate(1) then reuses that size
    call(1)
    tN, t1 = [], []
    for i in range(opts.runs):
        tN.append(call(N))
        t1.append(call(1))
        log(f"  HF run {i + 1}/{opts.runs}: generate({N}) {tN[-1]:.3f} s, generate(1) {t1[-1]:.3f} s")
    decode_s = statistics.median(tN) - statistics.median(t1)
    steps = N - 1
    weight_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters()
                       if not ("embed_tokens" in n and not args.tie_embeddings))
    weight_params = sum(p.numel() for n, p in hf.named_parameters()
                        if not ("embed_tokens" in n and not args.tie_embeddings))
    slot_bytes = args.n_kv_heads * args.head_dim * 2 * dtype.itemsize * args.n_layers * cfg.batch
    kv_read = slot_bytes * mean_valid_slots(cfg.ctx, N, args.sliding_window)
    row.update(cache_slots=cfg.cache_slots(N), weight_bytes=weight_bytes, kv_bytes_per_slot=slot_bytes,
               generate_N_s_runs=tN, generate_1_s_runs=t1)
    if decode_s <= 0:
        row.update(status="error", note="generate(N) was not slower than generate(1)")
    else:
        ttft = statistics.median(t1)
        row.update(status="ok", decode_tok_s=steps * cfg.batch / decode_s, step_ms=decode_s / steps * 1e3,
                   kv_read_bytes_per_step=kv_read, GBps=(weight_bytes + kv_read) * steps / decode_s / 1e9,
                   weights_only_GBps=weight_bytes * steps / decode_s / 1e9, ttft_s=ttft,
                   prefill_tok_s=cfg.batch * cfg.ctx / ttft,
                   prefill_TFLOPs=prefill_flops(args, weight_params, cfg.batch, cfg.ctx) / ttft / 1e12,
                   peak_memory_bytes=peak_memory(device))
    del hf
    if opts.compile:
        torch._dynamo.reset()
    free_memory(device)


# ----------------------------------------------------------------------------- cold / warm start

def worker_main(opts):
    """--worker: one first call in this fresh process; prints one JSON line for the parent."""
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    cfg = Config(opts.models, weights=opts.weights, kv=opts.kv_dtypes, batch=int(opts.batch), ctx=int(opts.ctx))
    t = time.perf_counter()
    model = build_model(cfg.model, cfg.weights, device, dtype)
    build_s = time.perf_counter() - t
    gen = Generator(model, compile=opts.compile)
    kv_dtype = KV_CACHE_DTYPES[cfg.kv] if cfg.kv != "bf16" else dtype
    gen.setup(cfg.batch, int(opts.worker_slots), kv_dtype)
    prompts = torch.randint(0, model.args.vocab_size, (cfg.batch, cfg.ctx)).tolist()
    t = time.perf_counter()
    res = gen.generate(prompts, opts.new_tokens, Sampling())
    first_call_s = time.perf_counter() - t
    print(WORKER_TAG + json.dumps({"build_s": build_s, "first_call_s": first_call_s, "ttft_s": res.prefill_s,
                                   "first_step_s": res.first_decode_s,
                                   "import_to_end_s": time.perf_counter() - T0}), flush=True)
    return 0


def start_times(cfg: Config, opts, slots, cache_dir, timeout):
    """Cold then warm start of cfg in subprocesses sharing a fresh inductor cache dir."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    env.pop("TRITON_CACHE_DIR", None)  # inductor then keeps Triton's cache under cache_dir too
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--suite", opts.suite,
           "--compile" if opts.compile else "--no-compile", "--device", opts.device, "--dtype", opts.dtype,
           "--models", cfg.model, "--weights", cfg.weights, "--kv-dtypes", cfg.kv, "--batch", str(cfg.batch),
           "--ctx", str(cfg.ctx), "--worker-slots", str(slots), "--new-tokens", str(min(opts.new_tokens, 16))]
    out = {"config": asdict(cfg), "cache_slots": slots, "new_tokens": min(opts.new_tokens, 16),
           "compile": opts.compile, "method": "fresh process, fresh TORCHINDUCTOR_CACHE_DIR (cold), then the same "
                                              "command on that dir (warm); process_s = spawn to exit"}
    for kind in ("cold", "warm"):
        log(f"{kind} start: {cfg.label()} in a subprocess")
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            out[kind] = {"status": "timeout", "process_s": time.perf_counter() - t}
            return out
        process_s = time.perf_counter() - t
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(WORKER_TAG)]
        if p.returncode != 0 or not lines:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            out[kind] = {"status": "error", "note": tail[:200], "process_s": process_s}
            log(f"{kind} start failed: {p.stderr[-2000:]}")
            return out
        out[kind] = {"status": "ok", "process_s": process_s, **json.loads(lines[-1][len(WORKER_TAG):])}
        log(f"{kind} start: process {process_s:.1f} s, first call {out[kind]['first_call_s']:.1f} s")
    return out


# ----------------------------------------------------------------------------- report

def git_commit():
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True, text=True,
                           timeout=10)
        if r.returncode != 0:
            return "unknown"
        commit = r.stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=str(ROOT), timeout=10).returncode
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def header(device, opts):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        total = None
    return {"device": name, "device_memory_bytes": total, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": package_version("triton"), "transformers": package_version("transformers"),
            "git_commit": git_commit(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "argv": sys.argv[1:], "suite": opts.suite,
            "new_tokens": opts.new_tokens, "runs": opts.runs, "compile": opts.compile, "dtype": opts.dtype}


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(report) -> str:
    h = report["header"]
    copy_bw = (report.get("copy_bandwidth") or {}).get("GBps")
    mm = (report.get("matmul") or {}).get("TFLOPs")
    lines = [f"### bench: {h['device']} | torch {h['torch']} | commit {h['git_commit']} | {h['date']}",
             f"suite {h['suite']}, {h['new_tokens']} new tokens, median of {h['runs']}, compile={h['compile']}, "
             f"copy BW {_f(copy_bw, '.0f')} GB/s, {report.get('matmul', {}).get('dtype', '')} "
             f"{report.get('matmul', {}).get('n', '')}^3 matmul {_f(mm, '.3g')} TFLOP/s",
             "",
             "| model | w | kv | B | ctx | cache | tok/s | ms/step | GB/s | %copy | pf tok/s | pf %mm | TTFT ms "
             "| 1st s | peak GB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        c = r["config"]
        ok = r.get("status") == "ok"
        name = c["model"] + (" HF" if r.get("impl") == "hf" else "")
        pct = r["GBps"] / copy_bw * 100 if ok and copy_bw else None
        pfmm = r["prefill_TFLOPs"] / mm * 100 if ok and mm else None
        first = r.get("first_step_s") if r.get("impl") != "hf" else r.get("first_call_s")
        note = r.get("note", "") if ok else (r.get("status", "") + (": " + r["note"] if r.get("note") else ""))
        kp = r.get("kernel_profile") or {}
        if "kernel_sum_ms_per_step" in kp:
            note = (note + "; " if note else "") + (f"kernels {kp['kernel_sum_ms_per_step']:.2f} ms/step of "
                                                    f"{kp['replay_step_ms']:.2f} ms replay")
        elif kp.get("note"):
            note = (note + "; " if note else "") + "kernel profile: " + kp["note"]
        lines.append("| " + " | ".join([
            name, c["weights"], c["kv"], str(c["batch"]), fmt_size(c["ctx"]), fmt_size(c["cache"]),
            _f(r.get("decode_tok_s") if ok else None, ".1f"), _f(r.get("step_ms") if ok else None, ".2f"),
            _f(r.get("GBps") if ok else None, ".0f"), _f(pct, ".0f"), _f(r.get("prefill_tok_s") if ok else None, ".0f"),
            _f(pfmm, ".0f"), _f(r["ttft_s"] * 1e3 if ok else None, ".1f"), _f(first if ok else None, ".1f"),
            _f(r["peak_memory_bytes"] / 1e9 if ok else None, ".1f"), note.replace("|", "/")]) + " |")
    for s in report.get("start_times", []):
        parts = []
        for kind in ("cold", "warm"):
            k = s.get(kind)
            if not k:
                continue
            if k.get("status") == "ok":
                parts.append(f"{kind} {k['process_s']:.1f} s (first call {k['first_call_s']:.1f} s, "
                             f"first decode step {k['first_step_s']:.1f} s)")
            else:
                parts.append(f"{kind} {k.get('status')} {k.get('note', '')}".strip())
        c = s["config"]
        lines.append(f"\nstart-up {c['model']} B={c['batch']} ctx={c['ctx']} cache={s['cache_slots']}"
                     f" compile={s['compile']}: " + "; ".join(parts))
    for n in report.get("notes", []):
        lines.append(f"\nnote: {n}")
    return "\n".join(lines)


def plot(report, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    series = {}
    for r in report["results"]:
        if r.get("status") != "ok":
            continue
        c = r["config"]
        key = (f"{c['model']}{' HF' if r.get('impl') == 'hf' else ''} {c['weights']}/kv {c['kv']} "
               f"B={c['batch']} cache={fmt_size(c['cache'])}")
        series.setdefault(key, []).append((c["ctx"], r["decode_tok_s"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("filled context (tokens)")
    ax.set_ylabel("decode tokens/s (all rows)")
    h = report["header"]
    ax.set_title(f"{h['device']} | torch {h['torch']} | {h['git_commit']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(report, out_dir: Path, stem: str, final: bool):
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    if final:
        shutil.copyfile(path, out_dir / "latest.json")
        note = plot(report, out_dir / f"{stem}.png")
        if note:
            report.setdefault("notes", []).append(note)
        else:
            report["plot"] = str(out_dir / f"{stem}.png")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, path)
        shutil.copyfile(path, out_dir / "latest.json")
    return path


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype of unquantized weights")
    p.add_argument("--models", default=None, help=f"comma list from: {', '.join(ALL_MODELS)}")
    p.add_argument("--weights", default=None, help="comma list: bf16, int8, int4-g64, ...")
    p.add_argument("--kv-dtypes", default=None, help="comma list: bf16, int8, fp8")
    p.add_argument("--batch", default=None, help="comma list of batch sizes")
    p.add_argument("--ctx", default=None, help="comma list of filled context lengths (16,2k,8k)")
    p.add_argument("--cache", default=None, help="comma list of cache slots: just (ctx + new tokens), 32k, 128k")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--hf", dest="hf", action="store_true", default=None, help="run the transformers comparison")
    p.add_argument("--no-hf", dest="hf", action="store_false")
    p.add_argument("--cold-start", dest="cold_start", action="store_true", default=None,
                   help="measure cold and warm start-up of the first configuration in subprocesses")
    p.add_argument("--no-cold-start", dest="cold_start", action="store_false")
    p.add_argument("--beyond-context", action="store_true",
                   help="allow caches/positions past a model's trained context (random weights: speed is the same)")
    p.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (default 1 GiB on cuda)")
    p.add_argument("--matmul-size", type=int, default=None, help="default 8192 on cuda, 512 on cpu")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start nothing new after this many seconds (0 = none); quick 560, full 570")
    p.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="print one table (and plot) from earlier JSON files instead of measuring")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-slots", type=int, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.explicit = {k for k in SUITES[opts.suite] if getattr(opts, k, None) is not None}
    for k, v in SUITES[opts.suite].items():
        if getattr(opts, k, None) is None:
            setattr(opts, k, v)
    if opts.cold_start is None:
        opts.cold_start = True
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    return opts


def split(s):
    return [x.strip() for x in str(s).split(",") if x.strip()]


def merge_main(opts):
    reports = [json.loads(p.read_text()) for p in opts.merge]
    merged = {"header": dict(reports[0]["header"], suite="merged: " + ", ".join(p.name for p in opts.merge)),
              "copy_bandwidth": reports[0].get("copy_bandwidth"), "matmul": reports[0].get("matmul"),
              "results": [r for rep in reports for r in rep.get("results", [])],
              "start_times": [s for rep in reports for s in rep.get("start_times", [])],
              "notes": list(dict.fromkeys(n for rep in reports for n in rep.get("notes", [])))}
    devices = {rep["header"]["device"] for rep in reports}
    if len(devices) > 1:
        merged["notes"].append(f"merged runs from different devices: {sorted(devices)}")
    write_outputs(merged, opts.out_dir, "merged", final=True)
    print(markdown(merged))
    return 0


def main(argv=None):
    opts = parse_args(argv)
    if opts.worker:
        return worker_main(opts)
    if opts.merge:
        return merge_main(opts)
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    models, weights, kv_dtypes = split(opts.models), split(opts.weights), split(opts.kv_dtypes)
    for m in models:
        ModelArgs.from_name(m)  # unknown names fail here, before anything runs
    for kv in kv_dtypes:
        if kv != "bf16" and kv not in KV_CACHE_DTYPES:
            print(f"error: unknown KV dtype {kv!r}; use one of bf16, {', '.join(KV_CACHE_DTYPES)}", file=sys.stderr)
            return 2
    if opts.suite == "quick" and not opts.explicit & {"batch", "ctx", "cache"}:
        plan = quick_plan(models, weights, kv_dtypes)
        hf_plan = [Config(plan[0].model)] if plan else []
    else:
        plan = grid(models, weights, kv_dtypes, [int(b) for b in split(opts.batch)],
                    [parse_size(c) for c in split(opts.ctx)], [parse_size(c) for c in split(opts.cache)],
                    opts.beyond_context)
        # HF: the first batch size at every filled context, just-enough cache (its static cache size)
        hf_plan = [Config(m, batch=int(split(opts.batch)[0]), ctx=parse_size(c)) for m in models
                   for c in split(opts.ctx)]
    stem = "bench_" + time.strftime("%Y%m%d-%H%M%S") + f"_{opts.suite}"
    report = {"header": header(device, opts), "results": [], "start_times": [], "notes": []}
    budget = opts.time_budget_s or float("inf")
    log(f"{report['header']['device']}, torch {torch.__version__}, commit {report['header']['git_commit']}; "
        f"{len(plan)} configurations, HF {'on' if opts.hf else 'off'}, budget {budget:.0f} s")

    # 1. the device's practical ceilings
    copy_bytes = opts.copy_bytes or (1 << 30 if device.type == "cuda" else 64 << 20)
    report["copy_bandwidth"] = copy_bandwidth(device, copy_bytes)
    mm_n = opts.matmul_size or (8192 if device.type == "cuda" else 512)
    report["matmul"] = matmul_rate(device, mm_n, dtype)
    free_memory(device)
    log(f"copy {report['copy_bandwidth']['GBps']:.0f} GB/s, matmul {report['matmul']['TFLOPs']:.3g} TFLOP/s")
    write_outputs(report, opts.out_dir, stem, final=False)

    # 2. cold / warm start of the headline configuration (before this process compiles anything,
    # so that this process can then share the warm cache dir)
    tmp_cache = None
    if opts.cold_start and plan:
        head = plan[0]
        tmp_cache = tempfile.mkdtemp(prefix="bench_inductor_")
        remaining = budget - (time.perf_counter() - T0)
        report["start_times"].append(start_times(head, opts, head.cache_slots(opts.new_tokens), tmp_cache,
                                                 min(remaining / 2, 300)))
        if opts.compile:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp_cache
            os.environ.pop("TRITON_CACHE_DIR", None)
        write_outputs(report, opts.out_dir, stem, final=False)

    # 3. the configurations, then HF (HF goes right after the headline in the quick plan)
    jobs = [("ours", c) for c in plan]
    if opts.hf:
        at = 1 if opts.suite == "quick" else len(jobs)
        jobs[at:at] = [("hf", c) for c in hf_plan]
    ours = OursRunner(opts, device, dtype)
    longest_first_call = 0.0
    total_memory = report["header"]["device_memory_bytes"]
    for impl, cfg in jobs:
        row = {"impl": impl, "config": asdict(cfg), "status": "pending"}
        report["results"].append(row)
        args = ModelArgs.from_name(cfg.model)
        slots = cfg.cache_slots(opts.new_tokens)
        elapsed = time.perf_counter() - T0
        new_compile = impl == "hf" or ours.model_key != (cfg.model, cfg.weights) \
            or ours.shape_key != (cfg.batch, slots, cfg.kv)
        if cfg.ctx + opts.new_tokens > slots:
            row.update(status="skip", note=f"ctx + new tokens > {slots} slots")
            continue
        if slots > args.max_position_embeddings and not (cfg.beyond_context or opts.beyond_context):
            row.update(status="skip", note=f"> context {args.max_position_embeddings}")
            continue
        if elapsed + (longest_first_call if new_compile else 10) > budget:
            row.update(status="not run", note=f"time budget ({budget:.0f} s)")
            continue
        if total_memory:  # weights + KV cache alone would not fit: do not even try
            est = _param_count(args) * {"bf16": dtype.itemsize, "int8": 1}.get(cfg.weights, 0.6)
            kv_item = 1 if cfg.kv in ("int8", "fp8") else dtype.itemsize
            est += cfg.batch * slots * args.n_layers * args.n_kv_heads * args.head_dim * 2 * kv_item
            if est > 0.97 * total_memory:
                row.update(status="OOM", note=f"est. {est / 1e9:.0f} GB > {total_memory / 1e9:.0f} GB")
                continue
        t = time.perf_counter()
        try:
            if impl == "hf":
                if cfg.weights != "bf16" or cfg.kv != "bf16":
                    row.update(status="skip", note="HF comparison runs bf16 only")
                    continue
                ours.release()  # HF needs the memory
                run_hf(cfg, opts, device, dtype, row)
            else:
                ours.run(cfg, row)
        except ImportError as e:
            row.update(status="skip", note=f"not available: {short_error(e)}")
            ours.release()
        except Exception as e:  # noqa: BLE001 - one failing configuration must not end the run
            if is_oom(e):
                row.update(status="OOM", note=short_error(e)[:80])
            else:
                row.update(status="error", note=short_error(e))
                traceback.print_exc(file=sys.stderr)
            ours.release()
        longest_first_call = max(longest_first_call, row.get("warmup_s") or row.get("first_call_s") or 0)
        log(f"{impl} {cfg.label()}: {row['status']}"
            + (f" {row['decode_tok_s']:.1f} tok/s, {row['GBps']:.0f} GB/s" if row["status"] == "ok" else "")
            + f" ({time.perf_counter() - t:.1f} s)")
        write_outputs(report, opts.out_dir, stem, final=False)
    ours.release()
    if tmp_cache:
        shutil.rmtree(tmp_cache, ignore_errors=True)
    if device.type == "cpu":
        report["notes"].append("CPU: peak memory is the process's max RSS")
    path = write_outputs(report, opts.out_dir, stem, final=True)
    log(f"wrote {path} and {opts.out_dir / 'latest.json'}" + (f", {report['plot']}" if "plot" in report else ""))
    print(markdown(report), flush=True)
    return 0


def _param_count(args: ModelArgs) -> int:
    d, hd = args.dim, args.head_dim
    per_layer = d * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * d + 3 * d * args.intermediate_size
    return args.n_layers * per_layer + args.vocab_size * d * (1 if args.tie_embeddings else 2)


if __name__ == "__main__":
    sys.exit(main())
