"""gpt-fast (pytorch-labs/gpt-fast) as a peer, run from the user's checkout (--gpt-fast-dir DIR).

No gpt-fast code lives in this repository: a child process imports model.py, generate.py and
quantize.py from DIR. A child, because gpt-fast's modules have our module names (model,
generate, quantize, tokenizer) and its generate.py sets Inductor options at import
(coordinate_descent_tuning among them) that must not leak into our rows or the HF rows.

The child times decode the way gpt-fast's generate.py does: its decode_one_token compiled with
mode="reduce-overhead", fullgraph=True and driven by its decode_n_tokens, with gpt-fast's
default sampling; its prefill (eager, gpt-fast's default) is timed on its own. One warm-up
generation (it compiles, like gpt-fast's sample -1), then --runs timed ones; medians.

    python scripts/bench_gpt_fast.py --gpt-fast-dir DIR --check    # can DIR be imported? (exit 0/1)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import (
    DTYPES,
    fill_random_,
    mean_valid_slots,
    prefill_flops,
    print_result,
    random_prompts,
    run_child,
    speed_fields,
    sync,
)

GPT_FAST_SAMPLING = dict(temperature=0.8, top_k=200)  # gpt-fast generate.py's command-line defaults
GPT_FAST_WEIGHTS = ("bf16", "int8")  # its int4 path packs with an op whose layout changed in torch 2.11
CHECK_TIMEOUT_S = 120
SCRIPT = Path(__file__).resolve()


class PeerUnavailable(Exception):
    """--gpt-fast-dir cannot be used; the message names the flag."""


# ----------------------------------------------------------------------------- parent side


def gpt_fast_commit(gpt_fast_dir: Path) -> str:
    """HEAD of DIR when DIR is the top of its own git checkout; "unknown" otherwise (a plain copy
    inside another repository must not report that repository's commit)."""

    def git(*args):
        r = subprocess.run(["git", "-C", str(gpt_fast_dir), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != gpt_fast_dir.resolve():
            return "unknown"
        return git("rev-parse", "HEAD") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_gpt_fast_dir(gpt_fast_dir: Path) -> str:
    """Import gpt-fast from DIR in a child process; its commit, or PeerUnavailable."""
    flag = f"--gpt-fast-dir {gpt_fast_dir}"
    if not (gpt_fast_dir / "model.py").is_file() or not (gpt_fast_dir / "generate.py").is_file():
        raise PeerUnavailable(f"{flag}: not a gpt-fast checkout (no model.py and generate.py there)")
    result = run_child(
        [sys.executable, str(SCRIPT), "--gpt-fast-dir", str(gpt_fast_dir), "--check"],
        env=None,
        cwd=str(SCRIPT.parent),
        timeout_s=CHECK_TIMEOUT_S,
        log_failure=False,
    )
    if result["status"] != "ok":
        raise PeerUnavailable(f"{flag}: importing gpt-fast failed: {result.get('note', result['status'])}")
    return gpt_fast_commit(gpt_fast_dir)


def gpt_fast_model_args(args, cache_slots: int) -> dict:
    """gpt-fast ModelArgs fields for our ModelArgs (any object with its fields: no import of our model here)."""
    rope_scaling = None
    if args.rope_scaling is not None:
        rope_scaling = {k: v for k, v in args.rope_scaling.items() if k != "type"}
    return dict(
        block_size=max(args.max_position_embeddings, cache_slots),  # RoPE table length and cache cap
        vocab_size=args.vocab_size,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        dim=args.dim,
        intermediate_size=args.intermediate_size,
        n_local_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rope_base=args.rope_base,
        norm_eps=args.norm_eps,
        rope_scaling=rope_scaling,
    )


def unsupported(args, weights: str, cache_slots: int, kv: str = "bf16") -> str | None:
    """Why gpt-fast cannot run this shape the way we do, or None."""
    if weights not in GPT_FAST_WEIGHTS:
        return f"gpt-fast peer runs {', '.join(GPT_FAST_WEIGHTS)} only"
    if kv != "bf16":
        return "gpt-fast keeps its KV cache in the compute dtype"
    if args.qkv_bias or args.qk_norm:
        return "gpt-fast has no qkv bias / qk norm"
    if args.head_dim != args.dim // args.n_heads:
        return "gpt-fast derives head_dim from dim / n_heads"
    if args.rope_scaling is not None and args.rope_scaling.get("type") != "llama3":
        return f"gpt-fast has no {args.rope_scaling.get('type')} RoPE scaling"
    if args.sliding_window is not None and cache_slots > args.sliding_window:
        return "gpt-fast has no sliding window"
    return None


def run_gpt_fast(cfg, opts, args, row: dict, timeout_s: float):
    """Measure one job in a child process; fills row like our rows."""
    slots = cfg.cache_slots(opts.new_tokens)
    row.update(gpt_fast_commit=opts.gpt_fast_commit, sampling=GPT_FAST_SAMPLING)
    reason = unsupported(args, cfg.weights, slots, cfg.kv)
    if reason:
        row.update(status="skip", note=reason)
        return
    if args.tie_embeddings:
        row["note"] = "output untied (gpt-fast cannot tie; same bytes per step)"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--gpt-fast-dir",
        str(opts.gpt_fast_dir),
        "--model-args",
        json.dumps(gpt_fast_model_args(args, slots)),
        "--weights",
        cfg.weights,
        "--batch",
        str(cfg.batch),
        "--ctx",
        str(cfg.ctx),
        "--slots",
        str(slots),
        "--new-tokens",
        str(opts.new_tokens),
        "--runs",
        str(opts.runs),
        "--device",
        opts.device,
        "--dtype",
        opts.dtype,
        "--compile" if opts.compile else "--no-compile",
    ]
    result = run_child(cmd, env=dict(os.environ), cwd=str(SCRIPT.parent), timeout_s=timeout_s)
    row.update(result)


# ----------------------------------------------------------------------------- child side


def import_gpt_fast(gpt_fast_dir: Path):
    """gpt-fast's generate module (it imports its model and tokenizer) from DIR, nowhere else."""
    sys.path.insert(0, str(gpt_fast_dir))
    import generate as gf_generate  # noqa: E402 - gpt-fast's, from DIR

    for module in (gf_generate, sys.modules["model"]):
        if Path(module.__file__).resolve().parent != gpt_fast_dir.resolve():
            raise ImportError(f"{module.__name__} came from {module.__file__}, not from {gpt_fast_dir}")
    return gf_generate


def build_gpt_fast(model_args: dict, weights: str, device, dtype):
    """gpt-fast's Transformer with random weights, made on the device (meta -> quantize -> to_empty -> fill)."""
    import model as gf_model  # gpt-fast's (import_gpt_fast put DIR first)

    with torch.device("meta"):
        model = gf_model.Transformer(gf_model.ModelArgs(**model_args))
        if weights == "int8":
            import quantize as gf_quantize

            model = gf_quantize.WeightOnlyInt8QuantHandler(model).convert_for_runtime()
        model = model.to(dtype)
    model.to_empty(device=device)
    fill_random_(model)
    return model.eval()


def weight_tensors(model):
    """What a decode step reads as weights: gpt-fast's own convention (embedding table excluded), KV cache excluded."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [t for n, t in tensors if not n.startswith("tok_embeddings.") and "kv_cache" not in n]


class GptFastGeneration:
    """One generation as gpt-fast's generate() does it, with prefill and decode timed apart."""

    def __init__(self, gf, model, prompt, new_tokens, device):
        self.gf, self.model, self.prompt, self.new_tokens, self.device = gf, model, prompt, new_tokens, device

    @torch.no_grad()  # as gpt-fast's generate()
    def __call__(self, on_token=lambda _: None):
        """(prefill s, decode s, perf_counter when decode started); on_token is gpt-fast's callback."""
        gf, B, T = self.gf, *self.prompt.shape
        sync(self.device)
        t0 = time.perf_counter()
        prompt_pos = torch.arange(0, T, device=self.device)
        next_token = gf.prefill(self.model, self.prompt, prompt_pos, **GPT_FAST_SAMPLING).clone()
        sync(self.device)
        t1 = time.perf_counter()
        input_pos = torch.tensor([T], device=self.device, dtype=torch.int)
        gf.decode_n_tokens(
            self.model, next_token.view(B, -1), input_pos, self.new_tokens - 1, callback=on_token, **GPT_FAST_SAMPLING
        )
        sync(self.device)
        return t1 - t0, time.perf_counter() - t1, t1

    def warm_up(self):
        """The first generation (it compiles): (its seconds, its first decode step's seconds)."""
        first_step_end = []

        def on_token(_token):
            if not first_step_end:
                sync(self.device)
                first_step_end.append(time.perf_counter())

        t = time.perf_counter()
        _, _, decode_start = self(on_token)
        return time.perf_counter() - t, first_step_end[0] - decode_start if first_step_end else None


def bytes_and_flops(model, batch, ctx, new_tokens):
    """Weight bytes, KV bytes per slot, mean KV bytes read per step, prefill FLOPs: our rows' conventions."""
    weights = weight_tensors(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    k_cache = model.layers[0].attention.kv_cache.k_cache  # [B, H, S, D]
    slot_bytes = 2 * k_cache[:, :, 0].numel() * k_cache.element_size() * len(model.layers)
    cfg = model.config
    flops = prefill_flops(sum(w.numel() for w in weights), cfg.n_layer, cfg.n_head * cfg.head_dim, batch, ctx)
    return weight_bytes, slot_bytes, slot_bytes * mean_valid_slots(ctx, new_tokens, None), flops


def child_measure(opts) -> dict:
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    gf = import_gpt_fast(opts.gpt_fast_dir)
    if opts.check:
        return {"status": "ok"}
    model = build_gpt_fast(json.loads(opts.model_args), opts.weights, device, dtype)
    with torch.device(device):
        model.setup_caches(max_batch_size=opts.batch, max_seq_length=opts.slots)
    if opts.compile:  # exactly gpt-fast's main(): the module-level function, which decode_n_tokens calls
        gf.decode_one_token = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    B, T, N = opts.batch, opts.ctx, opts.new_tokens
    generation = GptFastGeneration(gf, model, random_prompts(B, T, model.config.vocab_size).to(device), N, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s, first_step_s = generation.warm_up()
    runs = [generation() for _ in range(opts.runs)]
    prefill_s, decode_s = (statistics.median(r[i] for r in runs) for i in (0, 1))
    weight_bytes, slot_bytes, kv_read, flops = bytes_and_flops(model, B, T, N)
    return dict(
        status="ok",
        cache_slots=opts.slots,
        cache_alloc=model.max_seq_length,
        weight_bytes=weight_bytes,
        kv_bytes_per_slot=slot_bytes,
        warmup_s=warmup_s,
        first_step_s=first_step_s,
        decode_s_runs=[r[1] for r in runs],
        prefill_s_runs=[r[0] for r in runs],
        # what gpt-fast's generate.py prints: tokens per row over prefill + decode
        gpt_fast_style_tok_s=N / (prefill_s + decode_s),
        # its KVCache modules' k_cache / v_cache buffers, as allocated
        kv_cache_bytes=sum(
            b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("k_cache", "v_cache"))
        ),
        **speed_fields(B, T, N - 1, decode_s, prefill_s, weight_bytes, kv_read, flops, device),
    )


def parse_child_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt-fast-dir", type=Path, required=True)
    p.add_argument("--check", action="store_true", help="only import gpt-fast from DIR")
    p.add_argument("--model-args", help="gpt-fast ModelArgs fields as JSON")
    p.add_argument("--weights", choices=GPT_FAST_WEIGHTS, default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=16)
    p.add_argument("--slots", type=int, default=216)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--compile", dest="compile", action="store_true", default=True)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    return p.parse_args(argv)


def child_main(argv=None):
    opts = parse_child_args(argv)
    print_result(child_measure(opts))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
