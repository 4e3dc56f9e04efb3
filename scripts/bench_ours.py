"""Our engine: random-weight models at real shapes, and the timed generate() runs of one job."""

import dataclasses
import statistics
import sys
import time
import traceback

import torch
from bench_common import (
    fill_random_,
    free_memory,
    kernel_times,
    log,
    mean_valid_slots,
    prefill_flops,
    random_prompts,
    short_error,
    speed_fields,
    sync,
    time_loop,
)
from bench_plan import Config

from checkpoint import model_args_from_name
from generate import KV_CACHE_DTYPES, Generator, Sampling, kv_cache_bytes, model_weight_bytes
from model import Transformer, rope_inv_freq

DEFAULT_INT4_GROUPSIZE = 128
PROFILE_WARMUP_STEPS, PROFILE_TIMED_STEPS, PROFILED_STEPS = 3, 20, 5


def quant_config(weights: str) -> dict | None:
    if weights in ("bf16", "none"):
        return None
    if weights == "int8":
        return {"mode": "int8"}
    if weights.startswith("int4"):
        return {"mode": "int4", "groupsize": int(weights.partition("-g")[2] or DEFAULT_INT4_GROUPSIZE)}
    raise ValueError(f"unknown weight mode {weights!r}; use bf16, int8 or int4-g<groupsize>")


def named_args(name: str, layers: int = 0):
    """A named config's ModelArgs; with `layers`, the same shape with that many layers (a per-layer
    A/B that compiles fast: profile_decode.py / random_checkpoint.py --layers)."""
    args = model_args_from_name(name)
    return dataclasses.replace(args, n_layers=layers) if layers else args


def build_model(name: str, weights: str, device, dtype, args=None) -> Transformer:
    """Random weights at the real shapes, made on the device: meta model -> (quantize) -> to_empty -> fill.
    `args`: other ModelArgs than the named ones (a tensor-parallel rank's slice)."""
    args = args or model_args_from_name(name)
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


def kv_dtype_for(kv: str, dtype):
    return KV_CACHE_DTYPES[kv] if kv != "bf16" else dtype


def kv_bytes_per_slot(model: Transformer) -> int:
    """Bytes of KV cache per slot, over all rows and layers (scales included for quantized caches)."""
    return kv_cache_bytes(model) // model.cache_len


def weight_param_count(model, tied: bool) -> int:
    """Weights a token multiplies by: for a mixture, k of the E experts."""
    count = sum(p.numel() for n, p in model.named_parameters() if not (n.startswith("tok_embeddings.") and not tied))
    count += sum(b.numel() for n, b in model.named_buffers() if ".experts." in n)  # quantized experts
    expert = sum(t.numel() for n, t in model.state_dict().items() if ".experts." in n)
    args = model.args
    return count - expert + expert * args.n_active_experts // args.n_experts if args.n_experts else count


def experts_read_per_layer(args, batch: int) -> float:
    """Distinct experts `batch` tokens choose in a layer, expected under uniform routing:
    E * (1 - (1 - k/E)^batch) (k at batch 1, up to E)."""
    E, k = args.n_experts, args.n_active_experts
    return E * (1 - (1 - k / E) ** batch)


def active_weight_bytes(model, batch: int) -> int:
    """Weight bytes a decode step must read: all of them for a dense model; for a mixture the
    non-expert weights plus the distinct experts its tokens choose (experts_read_per_layer)."""
    total, args = model_weight_bytes(model), model.args
    if not args.n_experts:
        return total
    expert = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".experts." in n)
    return round(total - expert + expert * experts_read_per_layer(args, batch) / args.n_experts)


@torch.no_grad()  # as in generate(): a grad-mode change would recompile the step
def kernel_profile(gen: Generator, model, batch, pos, device):
    """Sum of CUDA kernel durations per decode step over a few CUDA-graph replays."""
    sampling = Sampling()
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    input_pos = torch.tensor([pos], device=device)
    for _ in range(PROFILE_WARMUP_STEPS):
        gen.decode_fn(model, token, input_pos, sampling)
    sync(device)
    replay_s = time_loop(lambda: gen.decode_fn(model, token, input_pos, sampling), device, PROFILE_TIMED_STEPS)
    table = kernel_times(lambda: gen.decode_fn(model, token, input_pos, sampling), PROFILED_STEPS, device)
    out = {
        "replay_step_ms": replay_s * 1e3,
        "profiled_steps": PROFILED_STEPS,
        "kernels_per_step": sum(calls for calls, _ in table.values()) / PROFILED_STEPS,
    }
    if table:
        out["kernel_sum_ms_per_step"] = sum(us for _, us in table.values()) / 1e3 / PROFILED_STEPS
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

    def compiles_for(self, cfg: Config) -> bool:
        """Would this job compile a new decode shape (the budget check needs to know)?"""
        slots = cfg.cache_slots(self.opts.new_tokens)
        return self.model_key != (cfg.model, cfg.weights) or self.shape_key != (cfg.batch, slots, cfg.kv)

    def _prepare(self, cfg: Config, slots: int) -> bool:
        """Model and decode shape for cfg, reusing what is alive; True when the shape is new."""
        if self.model_key != (cfg.model, cfg.weights):
            self.release()
            log(f"building {cfg.model} ({cfg.weights}) on {self.device}")
            t = time.perf_counter()
            self.model = build_model(cfg.model, cfg.weights, self.device, self.dtype)
            self.model_key = (cfg.model, cfg.weights)
            log(f"built in {time.perf_counter() - t:.1f} s")
        shape_key = (cfg.batch, slots, cfg.kv)
        if shape_key == self.shape_key:
            return False
        self.gen = self.shape_key = None
        if self.opts.compile:
            torch._dynamo.reset()  # one static compile per shape, never an automatic-dynamic one
        for layer in self.model.layers:  # drop the old cache before allocating the new one
            layer.attention.kv_cache = None
        free_memory(self.device)
        self.gen = Generator(self.model, compile=self.opts.compile, compile_prefill=self.opts.compile_prefill)
        self.gen.setup(cfg.batch, slots, kv_dtype_for(cfg.kv, self.dtype))
        self.shape_key = shape_key
        return True

    def run(self, cfg: Config, row: dict):
        opts, device, N = self.opts, self.device, self.opts.new_tokens
        slots = cfg.cache_slots(N)
        new_shape = self._prepare(cfg, slots)
        model, gen, args = self.model, self.gen, self.model.args
        # GB/s counts the bytes a step must read: for a mixture, the active (chosen) experts only
        weight_bytes, slot_bytes = active_weight_bytes(model, cfg.batch), kv_bytes_per_slot(model)
        row.update(
            cache_slots=slots, cache_alloc=model.cache_len, weight_bytes=weight_bytes, kv_bytes_per_slot=slot_bytes
        )
        if args.n_experts:
            row.update(
                total_weight_bytes=model_weight_bytes(model),
                experts_read_per_layer=experts_read_per_layer(args, cfg.batch),
                note=f"GB/s on the active {weight_bytes / 1e9:.2f} of {model_weight_bytes(model) / 1e9:.1f} GB "
                f"of weights ({experts_read_per_layer(args, cfg.batch):.1f} of {args.n_experts} experts per layer)",
            )
        if opts.compile_prefill:
            row["note"] = "; ".join(filter(None, (row.get("note"), "prefill compiled (dynamic shapes)")))
        prompts = random_prompts(cfg.batch, cfg.ctx, args.vocab_size).tolist()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log(f"warm-up {cfg.label()}" + (" (compiles)" if new_shape and opts.compile else ""))
        t = time.perf_counter()
        warm = gen.generate(prompts, N, Sampling())
        row["warmup_s"] = time.perf_counter() - t
        row["first_step_s"] = warm.first_decode_s if new_shape else None
        row["kv_cache_bytes"] = kv_cache_bytes(self.model)  # allocated, values and scales (issue 10)
        runs = []
        for i in range(opts.runs):
            res = gen.generate(prompts, N, Sampling())
            assert res.decode_steps == N - 1, (res.decode_steps, N)
            runs.append(res)
            log(
                f"  run {i + 1}/{opts.runs}: {res.decode_steps * cfg.batch / res.decode_s:.1f} tok/s, "
                f"TTFT {res.prefill_s * 1e3:.1f} ms"
            )
        decode_s = statistics.median(r.decode_s for r in runs)
        prefill_s = statistics.median(r.prefill_s for r in runs)
        kv_read = slot_bytes * mean_valid_slots(cfg.ctx, N, args.sliding_window)
        flops = prefill_flops(
            weight_param_count(model, args.tie_embeddings),
            args.n_layers,
            args.n_heads * args.head_dim,
            cfg.batch,
            cfg.ctx,
        )
        row.update(
            status="ok",
            decode_s_runs=[r.decode_s for r in runs],
            prefill_s_runs=[r.prefill_s for r in runs],
            **speed_fields(cfg.batch, cfg.ctx, N - 1, decode_s, prefill_s, weight_bytes, kv_read, flops, device),
        )
        if cfg.kernel_profile:
            row["kernel_profile"] = dict(self._kernel_profile(cfg), step_ms=row["step_ms"])

    def _kernel_profile(self, cfg: Config) -> dict:
        if self.device.type != "cuda" or not self.opts.compile:
            return {"note": "needs CUDA and --compile (it profiles CUDA-graph replays)"}
        log(f"kernel profile {cfg.model}")
        try:
            return kernel_profile(self.gen, self.model, cfg.batch, cfg.ctx, self.device)
        except Exception as e:  # noqa: BLE001 - keep the speed numbers of this row
            traceback.print_exc(file=sys.stderr)
            return {"note": f"failed: {short_error(e)}"}
