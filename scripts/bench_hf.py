"""Hugging Face transformers generate() on our shapes: random weights, static cache, compiled decode.

How the decode step is compiled (the row's "hf_compile" says which ran):
  auto     transformers' own path, what its docs recommend: generation_config.compile_config makes
           generate() compile the model's __call__ and use it for the one-token decode steps only.
           Prefill stays eager, so the static cache is allocated outside any CUDA graph, and
           generate() copies the logits it reads out of the graph's memory.
  forward  the fallback: our wrapper around torch.compile(model.forward) doing the same by hand:
           eager prefill, compiled one-token steps, each step marked as a new CUDA-graph step
           (torch.compiler.cudagraph_mark_step_begin) and its logits cloned.
  eager    --no-compile.
The plain recipe `hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)`
failed on an H100 (torch 2.11, transformers 5.17) with "accessing tensor output of CUDAGraphs
that has been overwritten by a subsequent run". The likely cause: the first compiled call is the
prefill, in which the static cache allocates its tensors lazily; allocated inside a CUDA graph
they are graph outputs, which the next replay overwrites. Both paths above keep prefill eager.
"""

import statistics
import time
import traceback

import torch
from bench_common import (
    fill_random_,
    free_memory,
    is_oom,
    log,
    mean_valid_slots,
    prefill_flops,
    random_prompts,
    short_error,
    speed_fields,
    sync,
)
from bench_plan import Config

from checkpoint import model_args_from_name
from model import ModelArgs

HF_COMPILE = dict(mode="reduce-overhead", fullgraph=True)  # what we use for our own decode step
AUTO, FORWARD, EAGER = "auto", "forward", "eager"
FIRST_REAL_TOKEN_ID = 3  # ids 0-2 are pad/bos/eos in hf_config: prompts never contain them


def hf_config(args: ModelArgs):
    import transformers

    if args.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": args.rope_base}
    else:
        rope = {
            **{k: v for k, v in args.rope_scaling.items() if k != "type"},
            "rope_type": args.rope_scaling["type"],
            "rope_theta": args.rope_base,
        }
    common = dict(
        hidden_size=args.dim,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        rope_parameters=rope,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if args.qk_norm:
        return transformers.Qwen3Config(**common)
    if args.qkv_bias:
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if args.sliding_window is not None:
        return transformers.MistralConfig(**common, sliding_window=args.sliding_window)
    return transformers.LlamaConfig(**common)


def build_hf(args: ModelArgs, device, dtype):
    import transformers

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(args), dtype=dtype)
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
    return hf.eval()


def decode_only_compiled_forward(eager_forward, compile_kwargs):
    """model.forward for the `forward` path: compiled for one-token steps, eager for prefill."""
    compiled = torch.compile(eager_forward, **compile_kwargs)

    def forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or input_ids.shape[-1] != 1:
            return eager_forward(*args, **kwargs)  # prefill: the static cache is allocated outside any graph
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
        out = compiled(*args, **kwargs)
        out.logits = out.logits.clone()  # the next replay overwrites the graph's output buffer
        return out

    return forward


def configure_compile(hf, path: str, device, compile_kwargs=HF_COMPILE):
    """Set hf up for one compile path. Static cache always; transformers' auto-compile only on `auto`
    (left enabled, it would compile a static-cache generate() on CUDA even under --no-compile)."""
    import transformers

    gen_cfg = hf.generation_config
    gen_cfg.cache_implementation = "static"
    gen_cfg.disable_compile = path != AUTO
    if path == AUTO:
        compile_config = transformers.CompileConfig(**compile_kwargs)
        if device.type != "cuda":
            compile_config._compile_all_devices = True  # transformers auto-compiles on CUDA only unless told
        gen_cfg.compile_config = compile_config
    elif path == FORWARD:
        hf.forward = decode_only_compiled_forward(hf.forward, compile_kwargs)


def check_compiled(hf, path: str):
    # generate() silently falls back to eager when its compile criteria fail; never report that as compiled
    if path == AUTO and not hasattr(hf, "_compiled_call"):
        raise RuntimeError("transformers did not auto-compile the decode step")


def compile_paths(opts) -> list[str]:
    if not opts.compile:
        return [EAGER]
    return [FORWARD] if opts.hf_compile == FORWARD else [AUTO, FORWARD]


def run_hf(cfg: Config, opts, device, dtype, row):
    """Measure cfg through each compile path in turn until one works (a failure is kept in the row)."""
    paths = compile_paths(opts)
    for i, path in enumerate(paths):
        try:
            return measure_hf(cfg, opts, device, dtype, row, path)
        except Exception as e:  # noqa: BLE001 - the next path may work
            if is_oom(e) or i == len(paths) - 1:
                raise
            traceback.print_exc()
            row.setdefault("hf_compile_failures", {})[path] = short_error(e)
            log(f"HF compile path {path!r} failed ({short_error(e)}); trying {paths[i + 1]!r}")
        finally:
            if opts.compile:
                torch._dynamo.reset()
            free_memory(device)


def measure_hf(cfg: Config, opts, device, dtype, row, path: str):
    import transformers

    args = model_args_from_name(cfg.model)
    hf = build_hf(args, device, dtype)
    row.update(
        transformers=transformers.__version__,
        hf_compile=path,
        attn_implementation=getattr(hf.config, "_attn_implementation", None),
    )
    configure_compile(hf, path, device)
    N = opts.new_tokens
    ids = random_prompts(cfg.batch, cfg.ctx, args.vocab_size, low=FIRST_REAL_TOKEN_ID).to(device)
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
    log(f"HF warm-up {cfg.label()} ({path})")
    row["first_call_s"] = call(N)  # sizes the static cache for N; generate(1) then reuses that size
    check_compiled(hf, path)
    call(1)
    tN, t1 = [], []
    for i in range(opts.runs):
        tN.append(call(N))
        t1.append(call(1))
        log(f"  HF run {i + 1}/{opts.runs}: generate({N}) {tN[-1]:.3f} s, generate(1) {t1[-1]:.3f} s")
    decode_s = statistics.median(tN) - statistics.median(t1)
    tied = args.tie_embeddings
    weights = [p for n, p in hf.named_parameters() if not ("embed_tokens" in n and not tied)]
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    slot_bytes = args.n_kv_heads * args.head_dim * 2 * dtype.itemsize * args.n_layers * cfg.batch
    row.update(
        cache_slots=cfg.cache_slots(N),
        weight_bytes=weight_bytes,
        kv_bytes_per_slot=slot_bytes,
        generate_N_s_runs=tN,
        generate_1_s_runs=t1,
    )
    if decode_s <= 0:
        row.update(status="error", note="generate(N) was not slower than generate(1)")
        return
    kv_read = slot_bytes * mean_valid_slots(cfg.ctx, N, args.sliding_window)
    flops = prefill_flops(
        sum(p.numel() for p in weights), args.n_layers, args.n_heads * args.head_dim, cfg.batch, cfg.ctx
    )
    row.update(
        status="ok",
        **speed_fields(
            cfg.batch, cfg.ctx, N - 1, decode_s, statistics.median(t1), weight_bytes, kv_read, flops, device
        ),
    )
