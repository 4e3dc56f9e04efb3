"""What to measure: configurations, suites, and the ordered list of jobs (implementation, config).

A job is ("ours" | "hf" | "gpt-fast", Config). Jobs run in list order and the time budget drops
whatever is left at the end, so every plan puts the highest-value rows first.
"""

from dataclasses import dataclass

ALL_MODELS = ["llama-3-8b", "llama-2-7b", "llama-3.2-1b", "mistral-7b-v0.1", "qwen2.5-7b", "smollm2-135m"]
MOE_MODELS = ["qwen3-30b-a3b", "mixtral-8x7b"]  # the moe suite's; GB/s counts the active bytes
SMALL_MODEL = "smollm2-135m"  # small enough for the CPU; its kernel profile shows launch overhead on a GPU
OURS, HF, GPT_FAST = "ours", "hf", "gpt-fast"
LONG_CTX, LONG_CACHE, BIG_BATCH = 8192, 32768, 8  # the quick suite's long-context and batched rows

SUITES = {
    # defaults for the flags; quick and peers are explicit lists of jobs, smoke and full are grids
    "smoke": dict(
        models=SMALL_MODEL,
        batch="1",
        ctx="16",
        cache="just",
        new_tokens=8,
        runs=1,
        compile=False,
        hf=False,
        weights="bf16",
        kv_dtypes="bf16",
        time_budget_s=0,
    ),
    "quick": dict(
        models="llama-3-8b,smollm2-135m",
        batch="1",
        ctx="16",
        cache="just",
        new_tokens=200,
        runs=3,
        compile=True,
        hf=True,
        weights="bf16",
        kv_dtypes="bf16",
        time_budget_s=560,
    ),
    # ours, transformers and gpt-fast side by side on one shape, plus our quantized rows and start-up
    "peers": dict(
        models="llama-3-8b",
        batch="1",
        ctx="16",
        cache="just",
        new_tokens=200,
        runs=3,
        compile=True,
        hf=True,
        weights="bf16,int8,int4-g64",
        kv_dtypes="bf16",
        time_budget_s=480,
    ),
    # mixtures of experts at batch 1 and 8 (Mixtral bf16 needs an H200: an H100 row reads "OOM")
    "moe": dict(
        models=",".join(MOE_MODELS),
        batch="1,8",
        ctx="16",
        cache="just",
        new_tokens=200,
        runs=3,
        compile=True,
        hf=False,
        weights="bf16,int8",
        kv_dtypes="bf16",
        time_budget_s=570,
    ),
    "full": dict(
        models=",".join(ALL_MODELS),
        batch="1,8,32",
        ctx="16,2k,8k",
        cache="just,32k,128k",
        new_tokens=200,
        runs=3,
        compile=True,
        hf=True,
        weights="bf16,int8,int4-g64",
        kv_dtypes="bf16,int8,fp8",
        time_budget_s=570,
    ),
}
GRID_FLAGS = {"batch", "ctx", "cache"}  # giving one of these turns quick/peers into a grid


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


def split(s):
    return [x.strip() for x in str(s).split(",") if x.strip()]


def headline_model(models):
    """The first model that is not the small one (llama-3-8b by default), else None."""
    return next((m for m in models if m != SMALL_MODEL), None)


def quick_plan(models: list[str], weights: list[str], kv_dtypes: list[str]) -> list[Config]:
    """Our rows, highest value first. A 32k cache may pass the trained context (the anchors measure
    Llama-3-8B with 32768 slots too: with random weights the speed is the same)."""
    big = headline_model(models)
    plan = []
    if big is not None:
        plan.append(Config(big))
        plan += [Config(big, weights=w) for w in weights if w != "bf16"]
        plan += [Config(big, kv=k) for k in kv_dtypes if k != "bf16"]
        plan += [
            Config(big, cache=LONG_CACHE, beyond_context=True),
            Config(big, ctx=LONG_CTX, cache=LONG_CACHE, beyond_context=True),
        ]
    if SMALL_MODEL in models:
        plan.append(Config(SMALL_MODEL, kernel_profile=True))
    if big is not None:
        plan.append(Config(big, batch=BIG_BATCH))
    return plan


def peers_plan(models: list[str], weights: list[str]) -> list[Config]:
    """Our rows for the peers suite: the headline shape in every weight mode."""
    big = headline_model(models) or models[0]
    return [Config(big)] + [Config(big, weights=w) for w in weights if w != "bf16"]


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
                            profile = m == SMALL_MODEL and b == 1 and ctx == ctxs[0]
                            out.append(
                                Config(m, w, kv, b, ctx, cache, kernel_profile=profile, beyond_context=beyond_context)
                            )
    return out


def plan_jobs(
    suite: str,
    grid_flags_given: bool,
    models,
    weights,
    kv_dtypes,
    batches,
    ctxs,
    caches,
    beyond_context=False,
    hf=False,
    gpt_fast=False,
) -> list[tuple[str, Config]]:
    """The ordered job list. Peers (bf16, and gpt-fast int8 when int8 is asked for) run on the
    shapes of our rows: right after our headline row in quick/peers, at the end of a grid."""
    if suite in ("quick", "peers") and not grid_flags_given:
        ours = quick_plan(models, weights, kv_dtypes) if suite == "quick" else peers_plan(models, weights)
        peer_shapes = ours[:1]
        head, rest = ours[:1], ours[1:]
    else:
        ours = grid(models, weights, kv_dtypes, batches, ctxs, caches, beyond_context)
        # peers: the first batch size at every filled context, just-enough cache
        peer_shapes = [Config(m, batch=batches[0], ctx=c) for m in models for c in ctxs]
        head, rest = ours, []
    peers = [(HF, c) for c in peer_shapes] if hf else []
    late_peers = []
    if gpt_fast:
        peers += [(GPT_FAST, c) for c in peer_shapes]
        if "int8" in weights:  # lowest value: the team already measured it (BENCHMARKS.md)
            late_peers = [(GPT_FAST, Config(c.model, weights="int8", batch=c.batch, ctx=c.ctx)) for c in peer_shapes]
    return [(OURS, c) for c in head] + peers + [(OURS, c) for c in rest] + late_peers


def param_count(args) -> int:
    """Parameters of a ModelArgs shape (embedding counted twice unless tied)."""
    d, hd = args.dim, args.head_dim
    ffn = 3 * d * args.intermediate_size
    if args.n_experts:  # every expert, and the router
        ffn = ffn * args.n_experts + d * args.n_experts
    per_layer = d * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * d + ffn
    return args.n_layers * per_layer + args.vocab_size * d * (1 if args.tie_embeddings else 2)


BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.6}  # int4: half a byte plus scales, zeros and padding
QUANTIZED_KV = ("int8", "fp8")
MEMORY_HEADROOM = 0.97  # weights + cache above this fraction of the device cannot run


def memory_estimate(cfg: Config, args, slots: int, dtype_bytes: int) -> float:
    """Bytes of weights + KV cache, a lower bound of what the job needs."""
    per_weight = BYTES_PER_WEIGHT.get(cfg.weights.partition("-")[0], dtype_bytes)
    kv_item = 1 if cfg.kv in QUANTIZED_KV else dtype_bytes
    kv = cfg.batch * slots * args.n_layers * args.n_kv_heads * args.head_dim * 2 * kv_item
    return param_count(args) * per_weight + kv


def static_skip(cfg: Config, args, slots: int, new_tokens: int, beyond_context: bool, total_memory, dtype_bytes):
    """(status, note) when the job cannot run whatever the time, else None."""
    if cfg.ctx + new_tokens > slots:
        return "skip", f"ctx + new tokens > {slots} slots"
    if slots > args.max_position_embeddings and not (cfg.beyond_context or beyond_context):
        return "skip", f"> context {args.max_position_embeddings}"
    if total_memory:
        est = memory_estimate(cfg, args, slots, dtype_bytes)
        if est > MEMORY_HEADROOM * total_memory:
            return "OOM", f"est. {est / 1e9:.0f} GB > {total_memory / 1e9:.0f} GB"
    return None
