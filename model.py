"""A Llama-family decoder in one file, top to bottom: ModelArgs, the attention mask, the layers
(KV cache, RMSNorm, RoPE, attention, MLP or mixture of experts) and the Transformer.

Weights use the Hugging Face rotate-half RoPE layout (what HF checkpoints ship), with q/k/v
fused into `wqkv` and gate/up fused into `w13` so a batch-1 decode step reads each layer's
weights in as few kernels as possible. Named configs and the checkpoint files (config.json +
model.safetensors) live in checkpoint.py, which imports this file; this file imports nothing
from the project.
"""

import inspect
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# flex_attention's sparse block size: the KV cache length is rounded up to a multiple of it.
BLOCK_SIZE = 128


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0  # 0 means n_heads (no GQA)
    head_dim: int = 0  # 0 means dim // n_heads
    intermediate_size: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096  # the model's context length
    sliding_window: int | None = None  # query at q sees kv > q - sliding_window
    qkv_bias: bool = False  # Qwen2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_embeddings: bool = False  # output projection shares tok_embeddings.weight
    # Mixture of experts (Mixtral, Qwen3-MoE): n_experts > 0 makes every layer's feed-forward a
    # router over n_experts SwiGLU experts of intermediate_size each, n_active_experts per token.
    n_experts: int = 0
    n_active_experts: int = 0

    def __post_init__(self):
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_experts and not 0 < self.n_active_experts <= self.n_experts:
            raise ValueError(f"n_active_experts ({self.n_active_experts}) must be in 1..n_experts ({self.n_experts})")


# ----------------------------------------------------------------------------- mask

# Older torch has no compute_q_blocks; the q-side index is only needed for backward.
_FROM_KV_BLOCKS_KW = (
    {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {}
)


def valid_kv(row_start, q_slot, kv_slot, sliding_window: int | None):
    """The offset-plus-length rule: may the query at slot q_slot see kv slot kv_slot?"""
    ok = (kv_slot >= row_start) & (kv_slot <= q_slot)
    if sliding_window is not None:
        ok = ok & (kv_slot > q_slot - sliding_window)
    return ok


def offset_length_dense_mask(
    start: torch.Tensor, q_start: torch.Tensor, q_len: int, kv_len: int, sliding_window: int | None = None
) -> torch.Tensor:
    """The same rule as a bool [B, 1, q_len, kv_len] tensor, for SDPA (eager, no compiler needed)."""
    q_slot = q_start.view(-1, 1, 1, 1) + torch.arange(q_len, device=start.device).view(1, 1, q_len, 1)
    kv_slot = torch.arange(kv_len, device=start.device).view(1, 1, 1, kv_len)
    mask = valid_kv(start.view(-1, 1, 1, 1), q_slot, kv_slot, sliding_window)
    # A left-pad query has no valid slot (flex returns 0 for it); let it see every slot so SDPA
    # gives a finite value instead of NaN, which would reach its own K/V slot. No real query
    # ever attends to a pad slot.
    return mask | ~mask.any(-1, keepdim=True)


def offset_length_block_mask(
    start: torch.Tensor, q_start: torch.Tensor, q_len: int, kv_len: int, sliding_window: int | None = None
) -> BlockMask:
    """The offset-plus-length mask (see valid_kv), built from tensor arithmetic alone.

    Row b's query i sits at absolute slot q = q_start + i and may attend to kv slots
    start[b] <= kv <= q (and kv > q - sliding_window). Blocks of BLOCK_SIZE kv slots wholly
    outside that range are skipped; blocks wholly inside skip the mask_mod ("full" blocks).
    start: [B] int, q_start: 0-d int tensor (every row's queries at the same slots), kv_len: a
    multiple of BLOCK_SIZE. (Per-row query slots go through the dense mask: see Transformer.forward.)
    """
    device = start.device
    window = sliding_window if sliding_window is not None else kv_len + q_len + 1  # "no window"
    n_q_blocks = (q_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    n_kv_blocks = kv_len // BLOCK_SIZE
    first_q = q_start.view(1, 1, 1, 1)  # [B=1, H=1, q blocks=1, kv blocks=1], broadcast below
    q_lo = first_q + (torch.arange(n_q_blocks, device=device) * BLOCK_SIZE).view(1, 1, -1, 1)  # each q block's first
    q_hi = torch.minimum(q_lo + BLOCK_SIZE - 1, first_q + q_len - 1)  # and last query slot
    kv_lo = (torch.arange(n_kv_blocks, device=device) * BLOCK_SIZE).view(1, 1, 1, -1)
    kv_hi = kv_lo + BLOCK_SIZE - 1
    row_start = start.view(-1, 1, 1, 1)
    # Some (q, kv) pair is valid iff some q in [max(q_lo, kv_lo, start), min(q_hi, kv_hi + window - 1)] exists.
    any_valid = (torch.maximum(torch.maximum(q_lo, kv_lo), row_start) <= torch.minimum(q_hi, kv_hi + window - 1)) & (
        row_start <= kv_hi
    )
    # Every pair is valid iff the block's corners are.
    all_valid = (kv_lo >= row_start) & (kv_hi <= q_lo) & (kv_lo > q_hi - window)
    partial = any_valid & ~all_valid

    def block_indices(blocks):
        count = blocks.sum(-1, dtype=torch.int32)
        # stable sort puts the selected block indices first, in increasing order
        order = torch.argsort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
        return count, order

    kv_num_blocks, kv_indices = block_indices(partial)
    full_kv_num_blocks, full_kv_indices = block_indices(all_valid)

    def mask_mod(b, h, q_idx, kv_idx):
        return valid_kv(start[b], q_start + q_idx, kv_idx, sliding_window)

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        **_FROM_KV_BLOCKS_KW,
    )


# ----------------------------------------------------------------------------- layers


class KVCache(nn.Module):
    """Preallocated K/V for every slot, written in place; the cache dtype is its own choice."""

    def __init__(self, batch_size, n_kv_heads, cache_len, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, cache_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: [T] slots, or [B, T] (each row its own); k, v: [B, Hkv, T, D]. Writes only: the
        # attention reads what it needs (read(), or the cache's own decode attention).
        write_slots(self.k_cache, input_pos, k.to(self.k_cache.dtype))
        write_slots(self.v_cache, input_pos, v.to(self.v_cache.dtype))

    def read(self):
        """The whole cache as K, V [B, Hkv, cache_len, D]."""
        return self.k_cache, self.v_cache

    def attends_at_decode(self) -> bool:
        """Does this cache bring its own decode attention (cache_attention_at_decode)? Not this one."""
        return False


def write_slots(cache: torch.Tensor, input_pos: torch.Tensor, x: torch.Tensor):
    """cache[b, :, input_pos[t] (or input_pos[b, t])] = x[b, :, t], in place; cache [B, H, S, D]."""
    if input_pos.dim() == 1:
        cache.index_copy_(2, input_pos, x)
    else:
        cache.scatter_(2, input_pos.view(x.shape[0], 1, -1, 1).expand(x.shape), x)


def rms_norm(x, weight, eps):
    # normalise in fp32, as the reference implementations do
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["type"] == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unknown rope scaling type {scaling['type']!r}")


def flex_attention_over_cache(q, cache, block_mask: BlockMask, kernel_options: dict | None = None):
    """Compiled path: flex_attention visits only each row's valid kv blocks (at decode, Inductor's
    flex-decoding kernel), so the work grows with the valid length, not the allocated cache."""
    k, v = cache.read()
    q = q.to(k.dtype)  # attention runs in the cache dtype; the mask keeps it to valid slots
    return flex_attention(
        q,
        k,
        v,
        block_mask=block_mask,
        enable_gqa=q.shape[1] != k.shape[1],
        scale=q.shape[-1] ** -0.5,
        kernel_options=kernel_options,
    )


def sdpa_attention_over_cache(q, cache, folded_mask: torch.Tensor):
    """Eager path (CPU or GPU, no compiler): SDPA over the first S cache slots with the dense
    mask [.., S] (S = every slot at decode; the slots up to the chunk's end at prefill).

    The G query heads that share a kv head are folded into the query axis ([B, Hkv, G*T, D]) so
    plain SDPA with a mask runs its fused kernel; SDPA's enable_gqa with a mask falls back to
    the unfused math kernel on CUDA. folded_mask: [B, 1, G*T, S], row g*T + t is query t's.
    """
    k, v = cache.read()
    q = q.to(k.dtype)
    B, n_heads, T, D = q.shape
    n_kv_heads, visible = k.shape[1], folded_mask.shape[-1]
    k, v = k[:, :, :visible], v[:, :, :visible]
    q = q.reshape(B, n_kv_heads, n_heads // n_kv_heads * T, D)
    if T == 1 and q.is_cuda:
        # Decode: the fused kernels split the work by query rows, and there are G of them, so
        # a long cache is read by a handful of thread blocks (8k filled in a 32k cache: 30 ms per
        # Llama-3-8B step). Two plain matmuls spread the cache over the whole GPU.
        scores = (q @ k.transpose(-1, -2)).float() * D**-0.5  # [B, Hkv, G, S]
        probs = scores.masked_fill(~folded_mask, float("-inf")).softmax(dim=-1)
        y = probs.to(v.dtype) @ v
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=folded_mask, scale=D**-0.5)
    return y.reshape(B, n_heads, T, D)


def cache_attention_at_decode(q, cache, row_start, q_slot, sliding_window: int | None):
    """Decode (T = 1) through the cache's own attention: quantize.QuantizedKVCache on CUDA, whose
    kernel reads the int8/fp8 values and scales over each row's valid slots (no dequantized copy)."""
    return cache.attend_at_decode(q, row_start, q_slot, sliding_window)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """RoPE's cos and sin [..., D] (rotate-half layout: both halves share an angle) at positions [...], in dtype."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # [..., D/2]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, attend, input_pos):
        return self.wo(self.attend_qkv(self.wqkv(x), cos, sin, attend, input_pos))

    def attend_qkv(self, qkv, cos, sin, attend, input_pos):
        """qkv [B, T, (Hq + 2 Hkv) D], wqkv's output -> the heads' output [B, T, Hq D], before wo
        (a separate method so that gemv.DecodeBlock can run the projections its own way)."""
        B, T, _ = qkv.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.kv_cache.update(input_pos, k, v)
        y = attend(q, self.kv_cache)  # reads the cache it needs, within each row's valid slots
        return y.to(qkv.dtype).transpose(1, 2).reshape(B, T, q_size)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # [gate; up]
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


@torch.compiler.assume_constant_result  # a fact about the machine: the compiler bakes it in
def is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def grouped_mm_available(x: torch.Tensor, experts) -> bool:
    """torch._grouped_mm's fast kernel: bf16 on an sm_90 GPU (elsewhere torch falls back to a loop
    that reads the group sizes on the host, which a CUDA graph cannot hold)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and experts.w13.dtype == torch.bfloat16  # not quantized experts
        and is_sm90(x.device.index or 0)
    )


def matvec(w, x):
    """w [..., out, in] times x [..., in] -> [..., out]."""
    if torch.compiler.is_compiling():
        # Inductor fuses the gather of w (and a dequantize) into one reduction: the chosen experts
        # are read once, never copied
        return (w * x.unsqueeze(-2)).sum(-1)
    return (w @ x.unsqueeze(-1)).squeeze(-1)  # eager: a product of that size would not fit


def top_k_by_max(probs, k: int):
    """probs [N, E] -> (values [N, k], ids [N, k]), largest first, like probs.topk(k) (ties: the
    lowest id, as torch.max). Each round takes the max and masks it out."""
    expert = torch.arange(probs.shape[-1], device=probs.device)
    values, ids = [], []
    for _ in range(k):
        value, idx = probs.max(dim=-1, keepdim=True)
        probs = torch.where(expert == idx, -1.0, probs)  # probabilities are >= 0
        values.append(value)
        ids.append(idx)
    return torch.cat(values, dim=-1), torch.cat(ids, dim=-1)


def weighted_sum(y, weights):
    """Each token's k expert outputs y [N, k, D] weighted by the router's weights [N, k], summed in fp32."""
    return (y.float() * weights.unsqueeze(-1)).sum(dim=1).to(y.dtype)


def pairs_by_expert(expert_ids, n_experts: int):
    """expert_ids [N, k] -> (order [N * k]: the (token, expert) pairs sorted by expert, stably;
    ends [n_experts]: one past each expert's last position in order). Static shapes."""
    sorted_ids, order = expert_ids.flatten().sort(stable=True)
    experts = torch.arange(n_experts, device=expert_ids.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, experts, right=True)


class Experts(nn.Module):
    """E SwiGLU experts stacked per projection: w13 [E, 2I, D] (gate; up) and w2 [E, D, I]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, inter = args.n_experts, args.dim, args.intermediate_size
        self.n_experts = E
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, D))
        self.w2 = nn.Parameter(torch.empty(E, D, inter))

    def weights(self, name: str, ids):
        """The float weights [..., out, in] of experts `ids` (an int or a tensor of ids).
        Quantized experts (quantize.py) dequantize here."""
        return getattr(self, name)[ids]

    def hidden(self, x, expert_ids):
        """x [N, D], expert_ids [N, k] -> SiLU(gate) * up [N, k, I] of the chosen experts."""
        gate, up = matvec(self.weights("w13", expert_ids), x.unsqueeze(1)).chunk(2, dim=-1)
        return F.silu(gate) * up

    def gathered(self, x, expert_ids):
        """x [N, D], expert_ids [N, k] -> [N, k, D]. Indexes the stacked weights with the router's
        choice, so a step reads only the chosen experts; static shapes (CUDA graphs)."""
        return matvec(self.weights("w2", expert_ids), self.hidden(x, expert_ids))

    def mixed(self, x, expert_ids, weights):
        """gathered, weighted by the router's weights [N, k] and summed over the k -> [N, D].
        gemv.DownMixExperts (batched decode on a GPU) does the down projection and the sum in one kernel."""
        return weighted_sum(self.gathered(x, expert_ids), weights)

    def grouped(self, x, expert_ids, use_grouped_mm: bool):
        """x [N, D], expert_ids [N, k] -> [N, k, D]. The (token, expert) pairs sorted by expert so
        each expert multiplies all its rows at once: torch._grouped_mm (static shapes), or a loop
        over the experts that reads their row counts on the host (eager prefill only)."""
        N, k = expert_ids.shape
        order, ends = pairs_by_expert(expert_ids, self.n_experts)
        if use_grouped_mm:

            def mm(rows, name):  # _grouped_mm takes [E, in, out]: the transposed view is its layout
                return torch._grouped_mm(rows, getattr(self, name).transpose(-2, -1), offs=ends.to(torch.int32))

        else:
            bounds = [0] + ends.tolist()
            spans = [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo]

            def mm(rows, name):
                return torch.cat([F.linear(rows[lo:hi], self.weights(name, e)) for e, lo, hi in spans])

        gate, up = mm(x[order // k], "w13").chunk(2, dim=-1)
        y = mm(F.silu(gate) * up, "w2")
        return torch.empty_like(y).index_copy_(0, order, y).view(N, k, -1)  # back to token order


class MoEFeedForward(nn.Module):
    """Mixture of experts: the router scores every expert, each token takes its top k and mixes
    their outputs with the softmax weights renormalised over those k (Mixtral; Qwen3-MoE with
    norm_topk_prob). The router stays in the compute dtype when the experts are quantized."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_active = args.n_active_experts
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)  # the router
        self.experts = Experts(args)

    def route(self, x, few: bool = False):
        """x [N, D] -> (weights [N, k] fp32, expert_ids [N, k]): softmax, top k, renormalise.
        `few` tokens (decode) under the compiler: the router as a reduction and top k as k rounds
        of max, which Inductor fuses into two small kernels; cuBLAS and torch.topk take four
        launches (~14 us a layer on an H200, ~15% of a Qwen3-30B-A3B step)."""
        few_compiled = few and torch.compiler.is_compiling()
        return self.pick(matvec(self.gate.weight, x) if few_compiled else self.gate(x), few)

    def pick(self, logits, few: bool = False):
        """The router's logits [N, E] -> route's (weights, expert_ids)."""
        probs = logits.float().softmax(dim=-1)
        if few and torch.compiler.is_compiling():
            weights, expert_ids = top_k_by_max(probs, self.n_active)
        else:
            weights, expert_ids = probs.topk(self.n_active, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), expert_ids

    def forward(self, x):
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        # Chosen from shapes alone, never from tensor values. Few (token, expert) pairs (a decode
        # step, batch 1 above all): gather the chosen experts. Many: group the pairs by expert.
        many = B * T * self.n_active > self.experts.n_experts
        weights, expert_ids = self.route(x2, few=not many)
        if many and grouped_mm_available(x, self.experts):
            y = weighted_sum(self.experts.grouped(x2, expert_ids, use_grouped_mm=True), weights)
        elif many and T > 1 and not torch.compiler.is_compiling():  # eager prefill
            y = weighted_sum(self.experts.grouped(x2, expert_ids, use_grouped_mm=False), weights)
        else:  # decode steps (CUDA graphs) and compiled code
            y = self.experts.mixed(x2, expert_ids, weights)
        return y.view(B, T, D)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args)

    def forward(self, x, cos, sin, attend, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, attend, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        # Set by setup_caches: each row's first valid KV slot (left padding lives below it).
        self.register_buffer("row_start", torch.zeros(0, dtype=torch.int32), persistent=False)
        self.max_seq_len = 0  # logical cache length; the allocation is rounded up to BLOCK_SIZE
        # While scripts/export.py exports the steps: the attention it exports ("flex" on CUDA, "sdpa"
        # elsewhere). A plain attribute, not torch.compiler.is_exporting(): under torch.compile on
        # CUDA, torch 2.11 reports True there too, which sent every compiled step to SDPA.
        self.export_attention: str | None = None
        # Inductor's flex-decoding options at decode (T = 1) under the compiler, for measuring them
        # (scripts/profile_decode.py --flex-decode-options); None: Inductor's defaults.
        self.flex_decode_options: dict | None = None

    def setup_caches(
        self, batch_size: int, max_seq_len: int, kv_cache_dtype: torch.dtype | None = None, cache_class=KVCache
    ):
        """Allocate the static KV cache. Call again to resize; cheap to call with the same sizes.

        cache_class(batch_size, n_kv_heads, cache_len, head_dim, kv_cache_dtype, device) makes each
        layer's cache: KVCache, or one the caller brings (quantize.QuantizedKVCache for int8/fp8).
        """
        device = self.tok_embeddings.weight.device
        dtype = kv_cache_dtype or self.tok_embeddings.weight.dtype
        cache_len = (max_seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
        self.max_seq_len = max_seq_len
        self.row_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
        for layer in self.layers:
            layer.attention.kv_cache = cache_class(
                batch_size, self.args.n_kv_heads, cache_len, self.args.head_dim, dtype, device
            )

    @property
    def cache_len(self) -> int:
        return self.layers[0].attention.kv_cache.k_cache.shape[2]

    def set_row_starts(self, row_start: torch.Tensor):
        """Row b's tokens begin at slot row_start[b] (left padding sits below it). In place."""
        self.row_start.copy_(row_start)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """tokens [B, T] written at slots input_pos [T] (consecutive), or [B, T] when each row has its
        own slots (speculative decoding: rows accept different numbers of guesses). Returns logits
        [B, T or keep, V] in fp32."""
        B, T = tokens.shape
        # One attention backend per forward, its mask built once and shared by every layer:
        # compiled -> flex_attention with the BlockMask; eager (any device) -> SDPA with the dense
        # mask, so running without --compile never waits for a compiler.
        mask_args = (self.row_start, input_pos[..., 0], T, self.cache_len, self.args.sliding_window)
        # An exported program (scripts/export.py) attends over the whole cache (no host read of
        # the position), through flex only if it exports flex: AOTInductor has no CPU flex_attention.
        # Speculative steps under the compiler (each row its own query slots, input_pos [B, T]) use
        # SDPA too: Inductor (torch 2.11 CUDA, 2.13 CPU) fails to generate flex's kernel for them.
        exporting = self.export_attention is not None
        per_row_slots = input_pos.dim() == 2
        cache = self.layers[0].attention.kv_cache
        if T == 1 and cache.attends_at_decode() and not exporting and not per_row_slots:
            attend = partial(
                cache_attention_at_decode,
                row_start=self.row_start,
                q_slot=input_pos,
                sliding_window=self.args.sliding_window,
            )
        elif torch.compiler.is_compiling() and self.export_attention in (None, "flex") and not per_row_slots:
            options = self.flex_decode_options if T == 1 else None
            attend = partial(
                flex_attention_over_cache, block_mask=offset_length_block_mask(*mask_args), kernel_options=options
            )
        else:
            if T > 1 and not exporting and not per_row_slots:  # eager prefill: attend over the slots up
                # to the chunk's end only, not the whole cache (an 8k prompt in a 32k cache). One host
                # read per chunk; decode and speculative steps (replayed as CUDA graphs) never read back.
                visible = min(self.cache_len, -(-(int(input_pos[-1]) + 1) // BLOCK_SIZE) * BLOCK_SIZE)
                mask_args = mask_args[:3] + (visible,) + mask_args[4:]
            group = self.args.n_heads // self.args.n_kv_heads
            folded_mask = offset_length_dense_mask(*mask_args).repeat(1, 1, group, 1)
            attend = partial(sdpa_attention_over_cache, folded_mask=folded_mask)
        # RoPE position of a token = its slot minus its row's start, so a left-padded row sees
        # exactly the positions it would see alone.
        positions = (input_pos.view(-1, T) - self.row_start.view(B, 1)).clamp(min=0)
        x = self.tok_embeddings(tokens)
        cos, sin = (t.unsqueeze(1) for t in rope_cos_sin(positions, self.inv_freq, x.dtype))  # [B, 1, T, D]
        x = self.run_layers(x, cos, sin, attend, input_pos)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        logits = F.linear(x, self.tok_embeddings.weight) if self.output is None else self.output(x)
        return logits.float()

    def run_layers(self, x, cos, sin, attend, input_pos):
        # A method of its own so that a block that runs eager under torch.compile (gemv.DecodeBlock with
        # programmatic dependent launch) breaks the graph here, at a call, not inside forward's loop:
        # Dynamo runs a whole frame eager after a graph break in a loop
        for layer in self.layers:
            x = layer(x, cos, sin, attend, input_pos)
        return x
