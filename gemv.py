"""Triton kernels for the decode step's weight reads: quantized linears and mixture-of-experts layers.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the weight.
Inductor turns `F.linear(x, w_int8.to(bf16)) * scales` into a converted bf16 copy of the weight
plus a cuBLAS GEMV (three weight passes), or into its own reduction kernel at about 45% of copy
bandwidth (measured, BENCHMARKS.md). These kernels read each weight byte once, convert in registers
and accumulate in fp32. Each is a `torch.library.triton_op`, so eager code, CUDA graphs and
torch.compile (fullgraph) all call the same kernel, and each has a plain PyTorch reference (the
`*_reference` functions, or the model's own code) that the GPU tests and the interpreter check
(scripts/interpret_kernels.py) compare it with. What is here, and who calls it:

  decode_gemv               DecodeLinear, DecodeBlock,   1 row, a float or int8 weight, one pass (beats cuBLAS),
                            Int8Linear                   the norm / SiLU * up / residual folded in
  decode_gemv_rope_kv       DecodeBlock (float)          wqkv's decode_gemv, RoPE and the cache write in its epilogue
  decode_gemv_experts       DecodeBlock, 1 token         the same over the token's k float experts
  int8_gemm_few_rows        Int8Linear, 2-16 rows        tensor cores over a 16-row tile, split over K
  int8_expert_gemv          Int8Experts, decode          decode_gemv's kernel with the int8 expert picked per row
  int8_expert_gemm_grouped  Int8Experts, 2-16 tokens     pairs grouped by expert, tensor cores
  expert_gate_up            DownMixExperts, 2-16 tokens  float gate/up grouped by expert
  expert_down_mix           DownMixExperts, 2+ tokens;   float down projection + routing-weighted sum
                            DecodeBlock, eager with PDL  (+ the residual)
  route                     DecodeBlock, eager with PDL  the router's softmax, top k, renormalised

int4_mma.py holds the CUDA (not Triton) int4 kernel of Int4Linear's decode rows, on tensor cores.
"""

import os

import torch

import kv_attention
from model import (
    Experts,
    FeedForward,
    KVCache,
    MoEFeedForward,
    RMSNorm,
    TransformerBlock,
    pairs_by_expert,
    top_k_by_max,
    weighted_sum,
)

try:  # Triton ships with CUDA builds of torch; a CPU-only install has none
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton = None


def int8_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, weight [N, K] int8, scales [N] -> [M, N] in x.dtype."""
    return ((x.float() @ weight.float().T) * scales.float()).to(x.dtype)


def int8_expert_gemv_reference(x, expert_ids, weight, scales) -> torch.Tensor:
    """x [X, K] float, expert_ids [R] (R a multiple of X; output row r reads x row r // (R / X)),
    weight [E, N, K] int8, scales [E, N] -> [R, N] in x.dtype."""
    x = x.repeat_interleave(expert_ids.numel() // x.shape[0], dim=0)
    w = weight[expert_ids].float() * scales[expert_ids].float().unsqueeze(-1)
    return (w @ x.float().unsqueeze(-1)).squeeze(-1).to(x.dtype)


def route_reference(logits, k: int):
    """logits [N, E] -> (weights [N, k] fp32, expert_ids [N, k]): MoEFeedForward.pick (softmax, top k,
    renormalised), what route does in one kernel."""
    weights, expert_ids = top_k_by_max(logits.float().softmax(dim=-1), k)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids


def expert_down_mix_reference(h, expert_ids, mix, weight) -> torch.Tensor:
    """h [N, k, I] (each token's SiLU(gate) * up per chosen expert), expert_ids [N, k], mix [N, k]
    (the routing weights), weight [E, D, I] float -> [N, D] in h.dtype: sum_j mix_j (w2[e_j] @ h_j)."""
    y = (weight[expert_ids].float() @ h.float().unsqueeze(-1)).squeeze(-1)  # [N, k, D]
    return (y * mix.float().unsqueeze(-1)).sum(dim=1).to(h.dtype)


def int4_tinygemm_layout(packed: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """quantize.quantize_int4's portable uint8 [n, k/2] (even column in the high nibble) -> the int32
    [n/8, k/(16 * inner_k_tiles), 32, inner_k_tiles/2] that torch's CUDA _convert_weight_to_int4pack
    writes (the index math of its packing kernel, in PyTorch): what int4_mma reads, built without a
    GPU for the layout check of int4_mma_probe.py; a GPU test checks it equals torch's op. Row n, supertile o: 2 *
    inner_k_tiles words at [n // 8, o, 4 * (n % 8) + c, i]; their nibble j (bits 4j, the high nibbles)
    and 4 + j (bits 16 + 4j, the low ones) hold k = 16 * inner_k_tiles * o + 32 i + 2 c + 8 j (+1)."""
    n, half_k = packed.shape
    supertiles = 2 * half_k // (16 * inner_k_tiles)
    b = packed.view(n // 8, 8, supertiles, inner_k_tiles // 2, 4, 4).to(torch.int64)  # tile, r, o, i, j, c
    b = b.permute(0, 2, 1, 5, 3, 4)  # tile, o, r, c, i, j
    shifts = 4 * torch.arange(4)
    word = ((b >> 4) << shifts).sum(-1) | ((b & 15) << (16 + shifts)).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.reshape(n // 8, supertiles, 32, inner_k_tiles // 2).contiguous()


def folded_input(x, norm_weight=None, eps=0.0) -> torch.Tensor:
    """What decode_gemv multiplies the weight by, in fp32: rms_norm(x) with norm_weight, else x."""
    h = x.float()
    if norm_weight is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    return h


def glu_output(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a w13 output [..., 2I] (gate, then up) -> [..., I]: FeedForward's hidden."""
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def decode_gemv_reference(x, weight, scales=None, norm_weight=None, residual=None, eps=0.0, glu=False):
    """x [1, K], weight [N, K] float (or int8 with scales [N]), norm_weight [K], residual [1, N] ->
    [1, N] in x.dtype: residual + weight @ folded_input(x), in fp32; with glu (a w13 weight, N = 2I,
    no residual) glu_output of that, [1, I]."""
    w = weight.float() if scales is None else weight.float() * scales.float().unsqueeze(-1)
    y = folded_input(x, norm_weight, eps) @ w.T
    if glu:
        y = glu_output(y)
    return (y if residual is None else y + residual.float()).to(x.dtype)


def decode_gemv_rope_kv_reference(x, weight, scales, norm_weight, bias, eps, cos, sin, k_cache, v_cache, slot, n_heads):
    """wqkv's decode_gemv (bias [1, N] where a residual goes), then kv_attention.rope_write_kv_reference
    without the query/key norms: writes the token's k and v into the caches at slot, returns q [1, Hq, 1, D]."""
    qkv = decode_gemv_reference(x, weight, scales, norm_weight, bias, eps)
    return kv_attention.rope_write_kv_reference(qkv, cos, sin, k_cache, v_cache, slot, n_heads, None, None, 0.0)


def decode_gemv_experts_reference(x, expert_ids, weight, norm_weight=None, eps=0.0, glu=False):
    """x [X, K], expert_ids [R] (R a multiple of X), weight [E, N, K] float -> [R, N] in x.dtype: row
    r is expert expert_ids[r] times folded_input(x row r // (R / X)); with glu, glu_output of it."""
    h = folded_input(x, norm_weight, eps).repeat_interleave(expert_ids.numel() // x.shape[0], dim=0)
    y = (weight[expert_ids].float() @ h.unsqueeze(-1)).squeeze(-1)
    return (glu_output(y) if glu else y).to(x.dtype)


# expert_down_mix: a batched decode step's float experts (MoEFeedForward.forward). On the H200 at
# Qwen3-30B-A3B's shapes, alone: 17 us for 2 tokens, 27 for 4 and 47 for 8 against Inductor's 21,
# 35 and 68-75; it loses at 1 token (13.2 against 12.5 us), so it starts at 2. In a 12-layer B8
# step: 3.501 -> 2.646 ms (Inductor's down projection there took 110 us a layer, the kernel 48;
# scripts/moe_down_sweep.py, profile_decode.py --layers 12, BENCHMARKS.md 2026-12-03/04). On by
# default since its model-level GPU test (tests/test_moe.py, batch 4) passed on an H200 (2026-12-04);
# FASTGEN_EXPERT_DOWN_KERNEL=0 turns it off (Inductor's fusion of the same ops).
EXPERT_DOWN_MIN_TOKENS = 2
EXPERT_DOWN_ENABLED = os.environ.get("FASTGEN_EXPERT_DOWN_KERNEL", "1") == "1"


def expert_down_config(tokens: int) -> dict:
    """The tile for a step of `tokens` tokens: BLOCK_D output rows of one token over the intermediate
    axis in BLOCK_I steps, each the best of the H200 sweep at that count (2: 17.1 us; 4: 27.2 us, where
    2's tile took 33.4; 8: 47.3 us). 3 and 5-7 tokens take the tile of the nearest count below. 1 token
    (DecodeBlock's eager MoE step with PDL): the sweep's best, 13.2 us on the H200 (2026-12-03), 13.8 on an
    H100 (2026-12-05), where the 2-token tile it ran until then (256 programs of 8 warps) took 23.4."""
    if tokens >= 8:
        return dict(BLOCK_D=16, BLOCK_I=128, num_warps=8, num_stages=3)
    if tokens >= 4:
        return dict(BLOCK_D=2, BLOCK_I=256, num_warps=2, num_stages=3)
    if tokens >= 2:
        return dict(BLOCK_D=8, BLOCK_I=128, num_warps=8, num_stages=3)
    return dict(BLOCK_D=2, BLOCK_I=512, num_warps=4, num_stages=3)


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def expert_down_mix_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [N, D] a decode step's tokens, weight the experts' stacked w2: float, on a GPU, N >= 2."""
    return EXPERT_DOWN_ENABLED and available(x) and weight.is_floating_point() and x.shape[0] >= EXPERT_DOWN_MIN_TOKENS


# expert_gate_up: the same steps' gate/up of the chosen float experts, grouped by expert (each chosen
# expert read once for all the tokens that chose it, through tensor cores) with SiLU(gate) * up in
# the epilogue. Why: in a 12-layer Qwen3-30B-A3B B8 step Inductor's gathered gate/up became the
# largest kernel once the down projection had its own (97-124 us a layer, BENCHMARKS.md 2026-12-03),
# and at 8 tokens x 8 of 128 experts about 50 distinct experts are read 64 times. Alone at 8 tokens
# it ties Inductor's (97.3 vs 95.9 us, moe_down_sweep.py --gate-up), but in that step it took 2.627
# -> 2.281 ms on the H200 (2026-12-04: Inductor's version also fuses the RMSNorm, and the two
# kernels then share nothing). On by default since; FASTGEN_EXPERT_GATE_UP_KERNEL=0 turns it off.
EXPERT_GATE_UP_MAX_TOKENS = 16  # one pair per token per expert: the kernel's 16-row tile
EXPERT_GATE_UP_ENABLED = os.environ.get("FASTGEN_EXPERT_GATE_UP_KERNEL", "1") == "1"


def expert_gate_up_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x [N, D] a decode step's tokens, weight the experts' stacked w13: float, on a GPU, 2 <= N <= 16."""
    return (
        EXPERT_GATE_UP_ENABLED
        and available(x)
        and weight.is_floating_point()
        and EXPERT_DOWN_MIN_TOKENS <= x.shape[0] <= EXPERT_GATE_UP_MAX_TOKENS
    )


def expert_gate_up_config(tokens: int) -> dict:
    """BLOCK_I intermediate rows of one expert (gate and up) over D in BLOCK_D steps (unswept)."""
    return dict(BLOCK_I=64, BLOCK_D=128, num_warps=4, num_stages=3)


# An int8 weight's tiles in _decode_gemv_kernel: each program reduces BLOCK_N output rows over K in
# BLOCK_K steps. Chosen by a sweep on an H200 over the Llama-3-8B projections with the prmt conversion
# (scripts/int8_gemv_sweep.py --convert, BENCHMARKS.md; it swept the int8-only kernel that
# _decode_gemv_kernel replaced on 2026-12-04, whose loop compiled to the same sm_90 instructions):
# 1024-wide K steps, 4 warps and no software pipelining everywhere; 8 rows per program where there
# are few rows or a long K (wo, w2), 4 for wqkv and w13, 8 again for the vocab projection.
def int8_gemv_config(n: int, k: int) -> dict:
    if k > 4096 or n <= 4096:
        return dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=1, CONVERT=INT8_CONVERT)
    if n > 65536:
        return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=1, CONVERT=INT8_CONVERT)
    return dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=1, CONVERT=INT8_CONVERT)


# decode_gemv: a batch-1 decode step's float linears (DecodeLinear), the int8 GEMV's loop over a bf16 /
# fp32 weight. On the H200 it beat cuBLAS (F.linear) at every projection of SmolLM2-135M and
# Llama-3-8B, each replayed 2-64 times in a CUDA graph (scripts/small_gemv_sweep.py, 2026-12-04):
# SmolLM2 wqkv 2.08 vs 3.67 us, wo 1.94 vs 3.37, w13 2.90 vs 4.14, w2 2.34 vs 5.10; Llama-3-8B wqkv
# 14.5 vs 17.5, wo 10.5 vs 12.8, w13 54.1 vs 55.0, w2 28.8 vs 32.4 (cuBLAS splits wo and w2 over K
# and adds a reduction kernel). Two rows per program won at every shape; warps and K steps moved
# the result by a few percent. In the whole replayed step (2026-12-04, third session): SmolLM2-135M
# 0.952 -> 0.763 ms, Llama-3-8B 4.616 -> 4.144 ms. On by default; FASTGEN_FLOAT_GEMV=0 gives cuBLAS.
FLOAT_GEMV_ENABLED = os.environ.get("FASTGEN_FLOAT_GEMV", "1") == "1"
# The same kernel with the block around it folded in (DecodeBlock: norm, SiLU * up, residual, and
# kv_attention.rope_write_kv for the norms, RoPE and cache write), a batch-1 layer in 7 kernels, not
# 12. Measured in the whole step on the H200 against the unfused GEMV (2026-12-04, third session):
# SmolLM2-135M (dim 576) 0.763 -> 0.693 ms, Qwen3-30B-A3B's attention half (dim 2048, 12 layers)
# 1.109 -> 0.999 ms, int8 Llama-3-8B 3.061 -> 2.995 ms; but bf16 Llama-3-8B (dim 4096) lost, 4.144
# -> 4.833 ms. Those runs folded SiLU(gate) * up into w2's loads, so each of w2's N / 2 programs
# recomputed all I sigmoids: 2048 x 14336 = 29M a Llama layer, ~7 us of the SFUs' exp alone (~4.2
# T/s on an H200), as much again for the division, against w2's 29 us. Since then w13's programs
# read gate row n and up row I + n and store SiLU(gate) * up, each sigmoid computed once (not yet
# timed on a GPU). The norm's fold re-reads x and its weight per program (2 rows a program for a
# float weight, int8's 4-8). By default ("auto") a float block is fused only up to
# FUSED_FLOAT_MAX_DIM, an int8 block always; FASTGEN_FUSED_DECODE=1 fuses every block, =0 none.
FUSED_DECODE = os.environ.get("FASTGEN_FUSED_DECODE", "auto")
FUSED_DECODE_ENABLED = FUSED_DECODE != "0"
FUSED_FLOAT_MAX_DIM = 2048 if FUSED_DECODE == "auto" else 1 << 30
# With it, a mixture-of-experts block's one token also goes through its k float experts as
# decode_gemv_experts (the norm folded into gate/up's loads, SiLU(gate) * up into its stores).
# A Triton expert GEMV lost to Inductor's gathered reduction on 2026-12-03 (1664 vs 1531 us a Qwen3
# step) with int8's 4-8 rows a program; at 2 rows it won: Qwen3-30B-A3B B1, 12 layers, 0.999 ->
# 0.965 ms (2026-12-04, third session). On by default; FASTGEN_EXPERT_GEMV=0 leaves the experts to Inductor.
EXPERT_GEMV_ENABLED = os.environ.get("FASTGEN_EXPERT_GEMV", "1") == "1"
# With it, a DecodeBlock without query/key norms (SmolLM2, Llama; not Qwen3) over an unquantized cache
# runs RoPE and the cache write in wqkv's epilogue (decode_gemv_rope_kv: a program reads rows i and
# i + D/2 of a head, rotate_half's pairs), so rope_write_kv's kernel goes: a layer in 6 kernels. It lost
# on an H100 while the small weights had the default tiles (2026-12-05, fourth session: SmolLM2 0.510 ->
# 0.523 ms) and won once they had their own (eighth session, the same run each: H200 0.428 -> 0.401 ms
# replayed, generate() 2285 -> 2436 tok/s; H100 with one split 0.432 -> 0.400). "float" (the default): float
# weights only, since only they were timed; "1": int8 weights too; "0": never.
ROPE_IN_QKV = os.environ.get("FASTGEN_ROPE_IN_QKV", "float")


def decode_gemv_config(n: int, k: int) -> dict:
    return dict(BLOCK_N=2, BLOCK_K=2048 if k > 4096 else 1024, num_warps=2 if k > 4096 else 4)


# A float weight of at most this many elements (SmolLM2-135M's w13 and w2) is read by fewer, longer
# programs: its step is latency-bound, not bandwidth-bound. On an H100 (2026-12-05, seventh session;
# scripts/fused_gemv_sweep.py, then the whole replayed step) SmolLM2's w13 with the norm and SiLU * up went
# 4.64 -> 3.55 us a call at 2 outputs (4 rows) a program and 2 warps, w2 2.87 -> 2.57 at 2048-wide K steps
# and 8 warps; the step 0.503 -> 0.472 -> 0.460 ms. The same w13 tile for Qwen3-30B-A3B's experts (8 x 3.1M)
# won alone (21.6 -> 19.0 us) but lost in the step (12 layers 0.993 -> 1.115 ms: under programmatic dependent
# launch the next kernel waits for the longer programs' tail), so larger weights keep the tiles above.
SMALL_FLOAT_WEIGHT = 2 * 2**20

# A larger float weight with a short K (Qwen3-30B-A3B's wqkv, [5120, 2048]) takes 8 outputs a program over
# 512-wide K steps: at 2 outputs and 1024-wide steps a program is only two loads deep. On an H100 (2026-12-05,
# eighth session; profile_decode.py --tile, the whole replayed step under PDL) 12 Qwen3 layers went 0.978 ->
# 0.943 ms. A square one loses with it: Llama-3.2-1B's wo [2048, 2048] 1.126 -> 1.177 ms a step (its wqkv
# [3072, 2048] neither gains nor loses: 1.127 with both on their old tile; H100, 2026-12-05, tenth session), and
# a vocabulary-wide head was never measured, so the rule holds for 3072 <= n <= 8192.
SHORT_K_FLOAT = 2048
SHORT_K_MIN_N = 3072
SHORT_K_MAX_N = 8192


def decode_gemv_whole_tiles(programs: int, k: int, cfg: dict) -> dict:
    """_decode_gemv_kernel's EVEN_K / EVEN_N for a launch of `programs` outputs (with RoPE, row pairs) over K
    with the tiles of cfg: no masks where the tiles divide the weight, for int8 weights only (CONVERT >= 0).
    Llama-3-8B int8 B1 went 3.789 -> 3.303 ms a step without them, bench.py 300.5 tok/s; a float weight's step
    lost 0.6-1.6% (5.359 -> 5.391 ms; H100, 2026-12-05, ninth session), so float weights keep them."""
    whole = kv_attention.WHOLE_TILES and cfg["CONVERT"] >= 0
    return {"EVEN_K": whole and k % cfg["BLOCK_K"] == 0, "EVEN_N": whole and programs % cfg["BLOCK_N"] == 0}


def decode_gemv_tiles(n: int, k: int, int8: bool, glu: bool) -> dict:
    """_decode_gemv_kernel's launch for an [n, k] weight: an int8 one takes int8_gemv_config's
    (swept on the H200), a float one the float sweep's; with glu a program's BLOCK_N outputs read twice as
    many weight rows, so it takes half as many."""
    cfg = int8_gemv_config(n, k) if int8 else {**decode_gemv_config(n, k), "CONVERT": -1}
    small = not int8 and n * k <= SMALL_FLOAT_WEIGHT
    if glu and small:
        cfg.update(BLOCK_N=2, num_warps=2)
    elif glu:
        cfg["BLOCK_N"] = max(1, cfg["BLOCK_N"] // 2)
    elif small and k > 1024:
        cfg.update(BLOCK_K=2048, num_warps=8)
    elif not int8 and not small and k <= SHORT_K_FLOAT and SHORT_K_MIN_N <= n <= SHORT_K_MAX_N:
        cfg.update(BLOCK_N=8, BLOCK_K=512)
    return cfg


# 2 to 16 activation rows (batch 2-16 decode) go through _int8_gemm_dot_kernel: tensor cores over a
# 16-row tile, split over K so that a short N still fills the GPU. On the H200 it read 830-3340 GB/s
# of int8 weight at 2, 4, 8 and 16 rows, against 245-1770 for the batch-1 kernel once per row or a
# converted bf16 copy and cuBLAS (scripts/int8_gemv_sweep.py --rows, BENCHMARKS.md). The tile sizes
# are the sweep's best at 8 rows for the Llama-3-8B projections: wider tiles and fewer splits as N
# grows, longer K steps for w2's K = 14336.
INT8_DOT_MAX_ROWS = 16


def int8_gemm_dot_config(n: int, k: int) -> dict:
    return dict(
        BLOCK_N=64 if n > 8192 else 32,
        BLOCK_K=256 if k > 4096 or n > 65536 else 128,
        SPLITS=1 if n > 65536 else (8 if n <= 4096 and k <= 4096 else 4),
        num_warps=4,
        num_stages=3,
    )


INT8_CONVERT = 2  # _int8_to_fp32's prmt form: 1-14% more GB/s than cvt on the H200 (BENCHMARKS.md)
if triton is not None:
    from kv_attention import pdl_launch_next, pdl_wait  # programmatic dependent launch (PDL)

    @triton.jit
    def prefetch_l2(ptrs):
        # ask L2 for the 128-byte line at each pointer (one pointer a line): weight bytes on their way while a
        # PDL kernel waits for the previous one. L2 is where the GPU's writes meet, so a line another kernel
        # is still writing is no stale copy: the load after the wait sees the write.
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; // $0 unused", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )

    # int8 -> fp32 without cvt: I2F runs at a quarter of the FP32 rate on sm_80/90, and at batch 1
    # there is one conversion per weight byte. prmt puts byte i of the sign-flipped word under the
    # exponent of 2^23, so the float is 2^23 + 128 + w exactly; one subtraction recovers w. Four
    # weights per asm call (pack=4: one 32-bit register of int8s).
    @triton.jit
    def _int8_to_fp32(w, CONVERT: tl.constexpr):
        if CONVERT == 0:  # cvt (I2F)
            f = w.to(tl.float32)
        elif CONVERT == 1:  # the same 2^23 trick in plain Triton integer ops
            f = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:  # prmt, four bytes per instruction group
            f = tl.inline_asm_elementwise(
                """
                {
                .reg .b32 biased, magic;
                xor.b32 biased, $4, 0x80808080;
                mov.b32 magic, 0x4B000000;
                prmt.b32 $0, biased, magic, 0x7440;
                prmt.b32 $1, biased, magic, 0x7441;
                prmt.b32 $2, biased, magic, 0x7442;
                prmt.b32 $3, biased, magic, 0x7443;
                sub.f32 $0, $0, 0f4B000080;
                sub.f32 $1, $1, 0f4B000080;
                sub.f32 $2, $2, 0f4B000080;
                sub.f32 $3, $3, 0f4B000080;
                }
                """,
                "=r,=r,=r,=r,r",
                [w],
                dtype=tl.float32,
                is_pure=True,
                pack=4,
            )
        return f

    @triton.jit
    def _decode_gemv_kernel(
        x_ptr,  # [K]
        w_ptr,  # [N, K] float, or int8 (CONVERT >= 0); with GLU [2N, K]: gate rows, then up rows
        scale_ptr,  # [N] ([2N] with GLU): an int8 weight's per-row scales
        norm_ptr,  # [K]: the RMSNorm weight applied to x first (NORM)
        res_ptr,  # [N]: the residual stream, added to the output (RESIDUAL)
        y_ptr,  # [N]
        ids_ptr,  # [R]: with EXPERTS, output row r goes through expert ids[r] of w [E, N, K]
        N,
        K,
        rows_per_x,  # with EXPERTS: output row r reads x row r // rows_per_x
        cos_ptr,  # [HEAD_DIM] (ROPE, and all below): the token's RoPE angles
        sin_ptr,
        k_ptr,  # [HKV, S, HEAD_DIM]: the KV cache of batch 1, written at slot
        v_ptr,
        slot_ptr,  # [1]
        S,
        EPS: tl.constexpr,  # the RMSNorm's (a constant: a float argument would reach the kernel as fp64)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NORM: tl.constexpr,
        GLU: tl.constexpr,
        RESIDUAL: tl.constexpr,
        CONVERT: tl.constexpr,  # -1: a float weight; else an int8 one, converted as _int8_to_fp32 does
        EXPERTS: tl.constexpr,
        PDL: tl.constexpr,  # launched with programmatic dependent launch (kv_attention.PDL)
        ROPE: tl.constexpr,  # wqkv: RoPE and the cache write in the epilogue (decode_gemv_rope_kv)
        HQ: tl.constexpr,  # with ROPE: query heads, kv heads, head dim
        HKV: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        EVEN_K: tl.constexpr,  # BLOCK_K divides K: no K step is partial
        EVEN_N: tl.constexpr,  # BLOCK_N divides the programs' outputs (with ROPE, their row pairs)
    ):
        # BLOCK_N outputs of one activation row, the weight read once. Each program reads all of
        # x anyway, so the norm costs no pass of its own: W (g * x * r) = r * (W (g * x)), with the
        # scalar r = rsqrt(mean(x^2) + eps) summed along the way and applied at the end. With GLU a
        # program reads gate row n and up row N + n and writes SiLU(gate) * up, w13's hidden, each
        # sigmoid computed once (folded into w2's loads, as it was until 2026-12-04, every w2 program
        # recomputed all of them). With ROPE a program reads rows i and i + HEAD_DIM / 2 of a head,
        # rotate_half's pairs, so that it can rotate its outputs itself.
        PAIRED: tl.constexpr = GLU or ROPE  # each output reads a second weight row
        if ROPE:
            pairs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            rows = pairs // (HEAD_DIM // 2) * HEAD_DIM + pairs % (HEAD_DIM // 2)
            partners = rows + HEAD_DIM // 2
        else:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            partners = rows + N  # GLU's up rows
        if PDL and not EXPERTS:  # the first weight tile's lines to L2 while the previous kernel finishes
            LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements a 128-byte line
            at = tl.minimum(tl.arange(0, BLOCK_K // LINE) * LINE, K - 1)  # clamped: no address outside w
            lines = w_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * K + at[None, :]
            prefetch_l2(lines)
            if GLU:
                prefetch_l2(lines + N.to(tl.int64) * K)
            if ROPE:
                prefetch_l2(w_ptr + tl.minimum(partners, N - 1).to(tl.int64)[:, None] * K + at[None, :])
        pdl_wait(PDL)  # the expert ids, x, the residual: written by earlier kernels
        if EXPERTS:  # program axis 1: the (token, expert) pair
            r = tl.program_id(1)
            e = tl.load(ids_ptr + r).to(tl.int64)
            if GLU:  # each expert's weight has 2N rows
                e = e * 2
            w_ptr += e * N * K
            scale_ptr += e * N
            x_ptr += (r // rows_per_x).to(tl.int64) * K
            y_ptr += r.to(tl.int64) * N
        cols = tl.arange(0, BLOCK_K)
        row_ok = (rows < N) | EVEN_N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        up_rows = w_ptr + partners.to(tl.int64)[:, None] * K  # read only if PAIRED
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            k_ok = (k < K) | EVEN_K
            w_ok = row_ok[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(
                w_rows + k[None, :], mask=w_ok, other=0, eviction_policy="evict_first"
            )  # read once: keep L2 for x
            if CONVERT >= 0:
                acc += _int8_to_fp32(w, CONVERT) * x[None, :]
            else:
                acc += w.to(tl.float32) * x[None, :]
            if PAIRED:
                w_up = tl.load(up_rows + k[None, :], mask=w_ok, other=0, eviction_policy="evict_first")
                if CONVERT >= 0:
                    acc_up += _int8_to_fp32(w_up, CONVERT) * x[None, :]
                else:
                    acc_up += w_up.to(tl.float32) * x[None, :]
        pdl_launch_next(PDL)
        # The epilogue's loads all issued before the sums, their latency under the reductions' (they were each
        # issued where used, after them: H100, 2026-12-07, SmolLM2 0.408 -> 0.394 ms a step replayed). Not before
        # the main loop: that lost (0.394 -> 0.403, tried beside the attention's slot read and 4 tiles asked into L2
        # before its PDL wait; the slot alone before the wait later won)
        if CONVERT >= 0:
            scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            if PAIRED:
                scale_up = tl.load(scale_ptr + partners, mask=row_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            res = tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            if ROPE:
                res_up = tl.load(res_ptr + partners, mask=row_ok, other=0.0).to(tl.float32)
        if ROPE:  # the angles of i and i + HEAD_DIM / 2 of each row's head, and the token's cache slot
            i = rows % HEAD_DIM
            cos = tl.load(cos_ptr + i, mask=row_ok, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + i, mask=row_ok, other=0.0).to(tl.float32)
            cos_partner = tl.load(cos_ptr + i + HEAD_DIM // 2, mask=row_ok, other=0.0).to(tl.float32)
            sin_partner = tl.load(sin_ptr + i + HEAD_DIM // 2, mask=row_ok, other=0.0).to(tl.float32)
            slot = tl.load(slot_ptr)
        y = tl.sum(acc, axis=1)
        up = tl.sum(acc_up, axis=1)
        if CONVERT >= 0:
            y = y * scale
            if PAIRED:
                up = up * scale_up
        if NORM:
            inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + EPS)
            y = y * inv_rms
            up = up * inv_rms
        if GLU:  # SiLU(gate) * up, FeedForward's hidden
            y = y * tl.sigmoid(y) * up
        if RESIDUAL:  # with ROPE, wqkv's bias (Qwen2)
            y += res
            if ROPE:
                up += res_up
        if ROPE:
            _rope_store(
                y, up, rows, row_ok, y_ptr, cos, sin, cos_partner, sin_partner, slot, k_ptr, v_ptr, S, HQ, HKV, HEAD_DIM
            )
        else:
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _rope_store(
        x,
        x_partner,
        rows,
        row_ok,
        q_ptr,
        cos,  # cos .. sin_partner: the angles of rows and of their partners
        sin,
        cos_partner,
        sin_partner,
        slot,  # the token's cache slot, loaded by the caller
        k_ptr,
        v_ptr,
        S,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
    ):
        # wqkv's outputs at rows (i < D / 2 of a head) and rows + D / 2, in fp32: rounded as wqkv's output
        # would be, then kv_attention.rope_write_kv's arithmetic: q and k rotated (q to q_ptr [HQ * D]), k
        # and v written to the cache at slot.
        x = x.to(q_ptr.dtype.element_ty).to(tl.float32)
        x_partner = x_partner.to(q_ptr.dtype.element_ty).to(tl.float32)
        head, i = rows // D, rows % D
        rotate = head < HQ + HKV  # v is not rotated
        y = tl.where(rotate, x * cos + -1.0 * x_partner * sin, x)
        y_partner = tl.where(rotate, x_partner * cos_partner + x * sin_partner, x_partner)
        is_q = head < HQ
        tl.store(q_ptr + rows, y.to(q_ptr.dtype.element_ty), mask=row_ok & is_q)
        tl.store(q_ptr + rows + D // 2, y_partner.to(q_ptr.dtype.element_ty), mask=row_ok & is_q)
        kv_head = tl.where(rotate, head - HQ, head - HQ - HKV)
        at = (kv_head * S + slot).to(tl.int64) * D + i  # [HKV, S, D]
        is_k = row_ok & ~is_q & rotate
        is_v = row_ok & ~rotate
        tl.store(k_ptr + at, y.to(k_ptr.dtype.element_ty), mask=is_k)
        tl.store(k_ptr + at + D // 2, y_partner.to(k_ptr.dtype.element_ty), mask=is_k)
        tl.store(v_ptr + at, y.to(v_ptr.dtype.element_ty), mask=is_v)
        tl.store(v_ptr + at + D // 2, y_partner.to(v_ptr.dtype.element_ty), mask=is_v)

    @triton.jit
    def _int8_expert_dot_kernel(
        x_ptr,  # [X, K]: pair p reads x row p // rows_per_x
        order_ptr,  # [R]: the pairs sorted by expert
        ends_ptr,  # [E]: one past each expert's last position in order
        w_ptr,  # [E, N, K] int8
        scale_ptr,  # [E, N]
        part_ptr,  # [SPLITS, R, N] fp32: each K split's scaled partial product, in pair order
        R,
        N,
        K,
        rows_per_x,
        k_per_split,
        BLOCK_M: tl.constexpr,  # >= the most pairs one expert can get (one per token: tokens <= 16)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        CONVERT: tl.constexpr = 0,
    ):
        # one expert's pairs at once through tensor cores: each chosen expert's tile is read once
        # for all the tokens that chose it; an expert nobody chose costs a program that exits
        e, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        count = tl.load(ends_ptr + e) - start
        if count > 0:
            ms, cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K)
            rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_ok, row_ok = ms < count, rows < N
            pairs = tl.load(order_ptr + start + ms, mask=m_ok, other=0)
            x_rows = x_ptr + (pairs // rows_per_x).to(tl.int64)[:, None] * K
            w_rows = w_ptr + e.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            k_lo = split * k_per_split
            for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
                k = k0 + cols
                k_ok = k < K
                x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(
                    w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0, eviction_policy="evict_first"
                )
                w = _int8_to_fp32(w, CONVERT).to(x.dtype)  # exact: |w| <= 128
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            scale = tl.load(scale_ptr + e * N + rows, mask=row_ok, other=0.0).to(tl.float32)
            out = part_ptr + (split * R + pairs).to(tl.int64)[:, None] * N + rows[None, :]
            tl.store(out, acc * scale[None, :], mask=m_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _int8_gemm_dot_kernel(
        x_ptr,
        w_ptr,
        part_ptr,  # [SPLITS, M, N] fp32: each K split's unscaled partial product
        M,
        N,
        K,
        k_per_split,
        BLOCK_M: tl.constexpr,  # >= 16 (tl.dot's smallest M): rows past M are masked to 0
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        CONVERT: tl.constexpr = 0,
    ):
        # tensor cores for a few rows: x [BLOCK_M, BLOCK_K] @ W_tile^T, the int8 tile converted in
        # registers; split over K so that a short N still fills the GPU
        pid_n, split = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ms, cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K)
        row_ok, m_ok = rows < N, ms < M
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = split * k_per_split
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
            k = k0 + cols
            k_ok = k < K
            x = tl.load(x_ptr + ms[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(
                w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0, eviction_policy="evict_first"
            )
            w = _int8_to_fp32(w, CONVERT).to(x.dtype)  # exact: |w| <= 128
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        out = part_ptr + (split * M + ms)[:, None] * N + rows[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & row_ok[None, :])

    def _int8_gemm_dot_launch(launcher, x, weight, scales, BLOCK_N, BLOCK_K, SPLITS, CONVERT=INT8_CONVERT, **launch):
        M, K = x.shape
        N = weight.shape[0]
        k_per_split = triton.cdiv(triton.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
        part = torch.empty((SPLITS, M, N), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(N, BLOCK_N), SPLITS)
        launcher(_int8_gemm_dot_kernel)[grid](
            x,
            weight,
            part,
            M,
            N,
            K,
            k_per_split,
            BLOCK_M=16,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            CONVERT=CONVERT,
            **launch,
        )
        return (part.sum(0) * scales.float()).to(x.dtype)

    def int8_gemm_dot(x, weight, scales, BLOCK_N=64, BLOCK_K=128, SPLITS=4, **launch):
        """x [M, K] (M <= 16), weight [N, K] int8, scales [N] -> [M, N], with the tile sizes given
        (a plain function: scripts/int8_gemv_sweep.py's form)."""
        return _int8_gemm_dot_launch(lambda kernel: kernel, x, weight, scales, BLOCK_N, BLOCK_K, SPLITS, **launch)

    @triton_op("fastgen::int8_gemm_few_rows", mutates_args={})
    def int8_gemm_few_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x [M, K] (2 <= M <= INT8_DOT_MAX_ROWS, contiguous), weight [N, K] int8, scales [N] -> [M, N]."""
        N, K = weight.shape
        return _int8_gemm_dot_launch(wrap_triton, x, weight, scales, **int8_gemm_dot_config(N, K))

    @triton_op("fastgen::decode_gemv", mutates_args={})
    def decode_gemv(
        x: torch.Tensor,
        weight: torch.Tensor,
        scales: torch.Tensor | None = None,
        norm_weight: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        eps: float = 0.0,
        glu: bool = False,
    ) -> torch.Tensor:
        """decode_gemv_reference's contract, one kernel: x [1, K] -> [1, N] ([1, N / 2] with glu)."""
        x, weight = x.contiguous(), weight.contiguous()  # no-ops for the model's own tensors
        return _decode_gemv_launch(x, weight, None, scales, norm_weight, residual, eps, glu)

    @triton_op("fastgen::decode_gemv_experts", mutates_args={})
    def decode_gemv_experts(
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weight: torch.Tensor,
        norm_weight: torch.Tensor | None = None,
        eps: float = 0.0,
        glu: bool = False,
    ) -> torch.Tensor:
        """decode_gemv_experts_reference's contract, one kernel."""
        return _decode_gemv_launch(x.contiguous(), weight, expert_ids, None, norm_weight, None, eps, glu)

    def _decode_gemv_launch(x, weight, expert_ids, scales, norm_weight, residual, eps, glu, tiles=None, rope=None):
        """The ops' launch; `tiles` (BLOCK_N outputs a program, BLOCK_K, num_warps) replaces
        decode_gemv_tiles' for the sweeps (scripts/small_gemv_sweep.py, fused_gemv_sweep.py). rope:
        decode_gemv_rope_kv's (cos, sin, k_cache, v_cache, slot, n_heads); the output is then the query."""
        N, K = weight.shape[-2], weight.shape[-1]
        cfg = {**decode_gemv_tiles(N, K, scales is not None, glu or rope is not None), **(tiles or {})}
        outputs = N // 2 if glu else N  # SiLU(gate) * up of the two halves
        programs = N // 2 if glu or rope is not None else N  # with rope: a program a row pair, times BLOCK_N
        R = 1 if expert_ids is None else expert_ids.numel()
        cos, sin, k_cache, v_cache, slot, n_heads = rope or (weight, weight, weight, weight, weight, 0)
        _, n_kv_heads, S, head_dim = k_cache.shape if rope else (0, 0, 0, 2)
        y = torch.empty((R, n_heads * head_dim if rope else outputs), dtype=x.dtype, device=x.device)
        wrap_triton(_decode_gemv_kernel)[(triton.cdiv(programs, cfg["BLOCK_N"]), R)](
            x,
            weight,
            weight if scales is None else scales,  # never read without an int8 weight
            weight if norm_weight is None else norm_weight,  # never read without NORM
            weight if residual is None else residual,  # never read without RESIDUAL
            y,
            weight if expert_ids is None else expert_ids,  # never read without EXPERTS
            outputs,
            K,
            R // x.shape[0],
            cos,  # cos .. slot: read (the caches written) only with ROPE
            sin,
            k_cache,
            v_cache,
            slot,
            S,
            EPS=eps,
            NORM=norm_weight is not None,
            GLU=glu,
            RESIDUAL=residual is not None,
            EXPERTS=expert_ids is not None,
            ROPE=rope is not None,
            HQ=n_heads,
            HKV=n_kv_heads,
            HEAD_DIM=head_dim,
            **decode_gemv_whole_tiles(programs, K, cfg),
            **cfg,
            **kv_attention.pdl_launch(x),
        )
        return y

    @triton_op("fastgen::decode_gemv_rope_kv", mutates_args={"k_cache", "v_cache"})
    def decode_gemv_rope_kv(
        x: torch.Tensor,
        weight: torch.Tensor,
        scales: torch.Tensor | None,
        norm_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot: torch.Tensor,
        n_heads: int,
    ) -> torch.Tensor:
        """decode_gemv_rope_kv_reference's contract, one kernel: wqkv's GEMV with RoPE and the cache
        write in its epilogue (kv_attention.rope_write_kv's work, without the query/key norms)."""
        x, weight = x.contiguous(), weight.contiguous()  # no-ops for the model's own tensors
        rope = (cos, sin, k_cache, v_cache, slot, n_heads)
        q = _decode_gemv_launch(x, weight, None, scales, norm_weight, bias, eps, False, rope=rope)
        return q.view(1, n_heads, 1, k_cache.shape[-1])

    @triton_op("fastgen::int8_expert_gemv", mutates_args={})
    def int8_expert_gemv(
        x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        """x [X, K], expert_ids [R] (R a multiple of X), weight [E, N, K] int8, scales [E, N] -> [R, N]:
        output row r is x row r // (R / X) times expert expert_ids[r] (X = R: a row per pair; X =
        tokens: each token through its k experts, never copied k times). Each output row reads its
        expert once (rows that share an expert read it again: fine for a decode step's few rows)."""
        return _decode_gemv_launch(x.contiguous(), weight, expert_ids, scales, None, None, 0.0, False)

    @triton_op("fastgen::int8_expert_gemm_grouped", mutates_args={})
    def int8_expert_gemm_grouped(
        x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        """int8_expert_gemv's contract (x [X, K], expert_ids [R], R a multiple of X, at most 16 pairs
        per expert), but the pairs grouped by expert so that each chosen expert is read once for all
        its rows: batched decode, where tokens share experts."""
        x = x.contiguous()
        R, K = expert_ids.numel(), x.shape[1]
        E, N = weight.shape[:2]
        order, ends = pairs_by_expert(expert_ids, E)
        cfg = int8_gemm_dot_config(N, K)
        splits = cfg.pop("SPLITS")
        k_per_split = triton.cdiv(triton.cdiv(K, splits), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        part = torch.empty((splits, R, N), dtype=torch.float32, device=x.device)
        grid = (E, triton.cdiv(N, cfg["BLOCK_N"]), splits)
        wrap_triton(_int8_expert_dot_kernel)[grid](
            x,
            order,
            ends.to(torch.int32),
            weight,
            scales,
            part,
            R,
            N,
            K,
            R // x.shape[0],
            k_per_split,
            BLOCK_M=16,
            CONVERT=INT8_CONVERT,
            **cfg,
        )
        return part.sum(0).to(x.dtype)

    @triton.jit
    def _expert_gate_up_kernel(
        x_ptr,  # [X, D]: pair p reads x row p // rows_per_x
        order_ptr,  # [R]: the pairs sorted by expert
        ends_ptr,  # [E]: one past each expert's last position in order
        w_ptr,  # [E, 2I, D] float: the gate rows, then the up rows
        h_ptr,  # [R, I]: SiLU(gate) * up of each pair, in pair order
        D,
        inter,  # I
        rows_per_x,
        BLOCK_M: tl.constexpr,  # >= the most pairs one expert can get (one per token: tokens <= 16)
        BLOCK_I: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # one expert's pairs at once: its gate and up tiles are read once for all the tokens that
        # chose it; an expert nobody chose costs a program that exits
        e, pid_i = tl.program_id(0), tl.program_id(1)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        count = tl.load(ends_ptr + e) - start
        if count > 0:
            ms, cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
            rows = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
            m_ok, row_ok = ms < count, rows < inter
            pairs = tl.load(order_ptr + start + ms, mask=m_ok, other=0)
            x_rows = x_ptr + (pairs // rows_per_x).to(tl.int64)[:, None] * D
            gate_rows = w_ptr + e.to(tl.int64) * 2 * inter * D + rows.to(tl.int64)[:, None] * D
            up_rows = gate_rows + inter * D
            gate = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + cols
                d_ok = d < D
                x = tl.load(x_rows + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                w_ok = row_ok[:, None] & d_ok[None, :]
                w_gate = tl.load(gate_rows + d[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
                w_up = tl.load(up_rows + d[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
                gate = tl.dot(x, tl.trans(w_gate), gate, input_precision="ieee")
                up = tl.dot(x, tl.trans(w_up), up, input_precision="ieee")
            h = gate * tl.sigmoid(gate) * up
            out = h_ptr + pairs.to(tl.int64)[:, None] * inter + rows[None, :]
            tl.store(out, h.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])

    @triton_op("fastgen::expert_gate_up", mutates_args={})
    def expert_gate_up(x: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Experts.hidden's contract: x [N, D] (N <= EXPERT_GATE_UP_MAX_TOKENS), expert_ids [N, k],
        weight the stacked w13 [E, 2I, D] float -> SiLU(gate) * up [N, k, I] in x.dtype, each chosen
        expert read once for all the tokens that chose it."""
        x = x.contiguous()
        N, k = expert_ids.shape
        E, inter = weight.shape[0], weight.shape[1] // 2
        order, ends = pairs_by_expert(expert_ids, E)
        h = torch.empty((N * k, inter), dtype=x.dtype, device=x.device)
        cfg = expert_gate_up_config(N)  # scripts/moe_down_sweep.py replaces it to time other tiles
        grid = (E, triton.cdiv(inter, cfg["BLOCK_I"]))
        wrap_triton(_expert_gate_up_kernel)[grid](
            x, order, ends.to(torch.int32), weight, h, x.shape[1], inter, k, BLOCK_M=16, **cfg
        )
        return h.view(N, k, inter)

    @triton.jit
    def _expert_down_mix_kernel(
        h_ptr,  # [N, K_ACTIVE, I]
        ids_ptr,  # [N, K_ACTIVE]
        mix_ptr,  # [N, K_ACTIVE] fp32
        w_ptr,  # [E, D, I] float
        y_ptr,  # [N, D]
        res_ptr,  # [N, D]: the residual stream, added to the output (RESIDUAL)
        D,
        inter,  # I, the intermediate size
        K_ACTIVE: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_I: tl.constexpr,
        RESIDUAL: tl.constexpr,
        PDL: tl.constexpr,  # launched with programmatic dependent launch (kv_attention.PDL)
    ):
        # BLOCK_D outputs of token n, summed over its K_ACTIVE experts in one fp32 accumulator: the
        # routing weight scales h (I values) rather than each expert's output (D values)
        pdl_wait(PDL)
        pid_d, n = tl.program_id(0), tl.program_id(1)
        rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_I)
        row_ok = rows < D
        acc = tl.zeros((BLOCK_D, BLOCK_I), dtype=tl.float32)
        # expert by expert: all their rows at once was tried and lost (25.0 vs 13.7 us, H100, 2026-12-05; BENCHMARKS.md)
        for j in range(K_ACTIVE):
            e = tl.load(ids_ptr + n * K_ACTIVE + j).to(tl.int64)
            mix = tl.load(mix_ptr + n * K_ACTIVE + j)
            w_rows = w_ptr + e * D * inter + rows.to(tl.int64)[:, None] * inter
            h_row = h_ptr + (n * K_ACTIVE + j) * inter
            for i0 in range(0, inter, BLOCK_I):
                i = i0 + cols
                i_ok = i < inter
                h = tl.load(h_row + i, mask=i_ok, other=0.0).to(tl.float32) * mix
                w = tl.load(
                    w_rows + i[None, :],
                    mask=row_ok[:, None] & i_ok[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                )
                acc += w.to(tl.float32) * h[None, :]
        pdl_launch_next(PDL)
        y = tl.sum(acc, axis=1)
        if RESIDUAL:
            y += tl.load(res_ptr + n * D + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + n * D + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton_op("fastgen::expert_down_mix", mutates_args={})
    def expert_down_mix(
        h: torch.Tensor,
        expert_ids: torch.Tensor,
        mix: torch.Tensor,
        weight: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """expert_down_mix_reference's contract (plus residual [N, D], added when given): the chosen float
        experts' down projections and their routing-weighted sum in one kernel, each chosen expert read
        once per token. An opaque op:
        Inductor's own fusion of these ops took 110 us a layer in a Qwen3-30B-A3B B8 step on the
        H200, this kernel 48 (see EXPERT_DOWN_MIN_TOKENS). Measuring it: scripts/moe_down_sweep.py."""
        N, k, inter = h.shape
        D = weight.shape[1]
        y = torch.empty((N, D), dtype=h.dtype, device=h.device)
        cfg = expert_down_config(N)  # scripts/moe_down_sweep.py replaces it to time other tiles
        grid = (triton.cdiv(D, cfg["BLOCK_D"]), N)
        wrap_triton(_expert_down_mix_kernel)[grid](
            h.contiguous(),
            expert_ids.contiguous(),
            mix.float().contiguous(),
            weight,
            y,
            weight if residual is None else residual,  # never read without RESIDUAL (an input, as in decode_gemv)
            D,
            inter,
            K_ACTIVE=k,
            RESIDUAL=residual is not None,
            **cfg,
            **kv_attention.pdl_launch(h),
        )
        return y

    @triton.jit
    def _route_kernel(
        logits_ptr,  # [N, E]: the router's logits
        weights_ptr,  # [N, K_ACTIVE] fp32, out
        ids_ptr,  # [N, K_ACTIVE] int64, out
        E,
        K_ACTIVE: tl.constexpr,
        K_PAD: tl.constexpr,
        E_PAD: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # one token a program: its top K_ACTIVE logits by rounds of max (ties: the lowest id, as
        # model.top_k_by_max), and the softmax over them, which is the softmax over all E renormalised
        # over the chosen k (MoEFeedForward.pick)
        pdl_wait(PDL)
        pdl_launch_next(PDL)
        n = tl.program_id(0)
        experts = tl.arange(0, E_PAD)
        logits = tl.load(logits_ptr + n * E + experts, mask=experts < E, other=float("-inf")).to(tl.float32)
        slots = tl.arange(0, K_PAD)
        chosen = tl.full((K_PAD,), float("-inf"), dtype=tl.float32)
        chosen_ids = tl.zeros((K_PAD,), dtype=tl.int32)
        for j in tl.static_range(K_ACTIVE):
            best = tl.max(logits, axis=0)
            best_id = tl.min(tl.where(logits == best, experts, E_PAD), axis=0)
            chosen = tl.where(slots == j, best, chosen)
            chosen_ids = tl.where(slots == j, best_id, chosen_ids)
            logits = tl.where(experts == best_id, float("-inf"), logits)
        weights = tl.exp(chosen - tl.max(chosen, axis=0))  # 0 in the padding
        ok = slots < K_ACTIVE
        tl.store(weights_ptr + n * K_ACTIVE + slots, weights / tl.sum(weights, axis=0), mask=ok)
        tl.store(ids_ptr + n * K_ACTIVE + slots, chosen_ids.to(tl.int64), mask=ok)

    @triton_op("fastgen::route", mutates_args={})
    def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """route_reference's contract (MoEFeedForward.pick's) in one kernel: logits [N, E] -> (weights [N, k]
        fp32, expert_ids [N, k] int64), largest first."""
        N, E = logits.shape
        weights = torch.empty((N, k), dtype=torch.float32, device=logits.device)
        ids = torch.empty((N, k), dtype=torch.int64, device=logits.device)
        wrap_triton(_route_kernel)[(N,)](
            logits.contiguous(),
            weights,
            ids,
            E,
            K_ACTIVE=k,
            K_PAD=triton.next_power_of_2(k),
            E_PAD=triton.next_power_of_2(E),
            num_warps=1,
            **kv_attention.pdl_launch(logits),
        )
        return weights, ids


class DownMixExperts(Experts):
    """Float experts whose batched decode steps (2+ tokens on a GPU) run the down projection and the
    routing-weighted sum as one expert_down_mix kernel, and (2-16 tokens) their gate/up as one
    expert_gate_up kernel; everything else is Experts'."""

    def hidden(self, x, expert_ids):
        if expert_gate_up_available(x, self.w13):
            return expert_gate_up(x, expert_ids, self.w13)
        return super().hidden(x, expert_ids)

    def mixed(self, x, expert_ids, weights):
        if expert_down_mix_available(x, self.w2):
            return expert_down_mix(self.hidden(x, expert_ids), expert_ids, weights, self.w2)
        return super().mixed(x, expert_ids, weights)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, its batch-1 decode calls (one activation row, on a GPU) through decode_gemv."""
    # a strided weight stays on cuBLAS: decode_gemv would copy it every step
    if FLOAT_GEMV_ENABLED and x.numel() == weight.shape[1] and available(x) and weight.is_contiguous():
        y = decode_gemv(x.reshape(1, -1), weight).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return torch.nn.functional.linear(x, weight, bias)


class DecodeLinear(torch.nn.Linear):
    """A float nn.Linear whose batch-1 decode calls go through decode_gemv instead of cuBLAS (decode_linear)."""

    def forward(self, x):
        return decode_linear(x, self.weight, self.bias)


class DecodeBlock(TransformerBlock):
    """A block whose batch-1 decode step (one token, on a GPU) runs its projections as decode_gemv
    with the rest of the block folded in: the RMSNorm into wqkv's (and w13's) loop, the residual add
    into wo's (and w2's) store, SiLU(gate) * up into w13's store; and the query/key norms, RoPE and the
    cache write as one kernel (kv_attention.rope_write_kv, for an unquantized cache; with ROPE_IN_QKV,
    by default for float weights, and no query/key norms, in wqkv's epilogue instead). A dense layer takes
    7 kernels instead of 12 (6 with ROPE_IN_QKV). A mixture-of-experts layer folds its attention half, and with
    FASTGEN_EXPERT_GEMV its float experts run decode_gemv_experts. Every other call, and every call
    with FASTGEN_FUSED_DECODE=0, is TransformerBlock's. use_decode_kernels picks the blocks (see
    FUSED_DECODE: float blocks up to FUSED_FLOAT_MAX_DIM wide, int8 blocks)."""

    # Set by run_blocks_eager_under_compile: the batch-1 step runs eager even inside torch.compile
    eager_under_compile = False

    def forward(self, x, cos, sin, attend, input_pos):
        if not (FUSED_DECODE_ENABLED and x.numel() == x.shape[-1] and available(x)):
            return super().forward(x, cos, sin, attend, input_pos)
        if self.eager_under_compile and torch.compiler.is_compiling():  # eager: its kernels launch with PDL
            return _decode_block_eager(self, x, cos, sin, attend, input_pos)
        attention, ffn = self.attention, self.feed_forward
        x1 = x.reshape(1, -1)  # [1, D]
        h = project(attention.wo, self.attention_heads(x1, cos, sin, attend, input_pos), residual=x1)
        if type(ffn) is FeedForward:
            hidden = project(ffn.w13, h, norm_weight=self.ffn_norm.weight, eps=self.ffn_norm.eps, glu=True)  # [1, I]
            return project(ffn.w2, hidden, residual=h).view_as(x)
        if EXPERT_GEMV_ENABLED and type(ffn.experts) in (Experts, DownMixExperts):  # the token's k float experts
            ffn_norm = self.ffn_norm
            # the router as decode_gemv too, the norm folded in: Inductor's router kernel (matvec,
            # softmax, top k) and the norm's took 5.4 us a Qwen3-30B-A3B layer on the H200 (not yet
            # timed this way, 2026-12-04)
            router_logits = decode_gemv(h, ffn.gate.weight, norm_weight=ffn_norm.weight, eps=ffn_norm.eps)  # [1, E]
            # traced, Inductor fuses the pick (softmax, top k) and the weighted sum + residual into a few
            # kernels; eager with PDL (run_blocks_eager_under_compile, or no --compile) they are one kernel
            # each here instead of ~10 ATen ones, so the whole block is this repo's kernels, all launched
            # with PDL (timed only with PDL: 12 Qwen3 layers 0.870 ms, 2026-12-05; hence only with it)
            ours = kv_attention.PDL and not torch.compiler.is_compiling()
            weights, expert_ids = route(router_logits, ffn.n_active) if ours else ffn.pick(router_logits, few=True)
            ids = expert_ids.view(-1)
            hidden = decode_gemv_experts(h, ids, ffn.experts.w13, ffn_norm.weight, eps=ffn_norm.eps, glu=True)  # [k, I]
            if ours:
                return expert_down_mix(hidden.unsqueeze(0), expert_ids, weights, ffn.experts.w2, h).view_as(x)
            down = decode_gemv_experts(hidden, ids, ffn.experts.w2)  # [k, D]
            return (h + weighted_sum(down.unsqueeze(0), weights)).view_as(x)
        h = h.view_as(x)  # other experts: routed as TransformerBlock routes them
        return h + ffn(self.ffn_norm(h))

    def attention_heads(self, x1, cos, sin, attend, input_pos):
        """The batch-1 step's attention half up to wo: x1 [1, D], the block's input -> the heads [1, Hq * head_dim]."""
        attention = self.attention
        wqkv, norm = attention.wqkv, self.attention_norm
        # Qwen2's bias: added where a residual would be
        bias = None if wqkv.bias is None else wqkv.bias.view(1, -1)
        cache = attention.kv_cache
        q_norm, k_norm = attention.q_norm, attention.k_norm
        # the query/key norms' weights and eps (Qwen3), after the cache: both kernels' last arguments
        norms = (None, None, 0.0) if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps)
        cos_d, sin_d = cos.reshape(-1), sin.reshape(-1)  # [D]: the token's angles
        unquantized_cache = type(cache) in (KVCache, kv_attention.SplitKVCache)
        slot = input_pos.reshape(1)  # the token's cache slot
        scales = getattr(wqkv, "scales", None)  # an Int8Linear's
        rope_in_qkv = ROPE_IN_QKV == "1" or (ROPE_IN_QKV == "float" and scales is None)
        if rope_in_qkv and q_norm is None and unquantized_cache:  # wqkv, RoPE and the cache write: one kernel
            q = decode_gemv_rope_kv(
                x1,
                wqkv.weight,
                scales,
                norm.weight,
                bias,
                norm.eps,
                cos_d,
                sin_d,
                cache.k_cache,
                cache.v_cache,
                slot,
                attention.n_heads,
            )
            return attend(q, cache).to(x1.dtype).reshape(1, -1)
        qkv = project(wqkv, x1, norm_weight=norm.weight, eps=norm.eps, residual=bias)
        if unquantized_cache:  # one kernel for the norms, RoPE and the write
            q = kv_attention.rope_write_kv(
                qkv, cos_d, sin_d, cache.k_cache, cache.v_cache, slot, attention.n_heads, *norms
            )
            return attend(q, cache).to(qkv.dtype).reshape(1, -1)
        # a quantized cache quantizes as it writes
        return attention.attend_qkv(qkv.view(1, 1, -1), cos, sin, attend, input_pos).reshape(1, -1)


# A graph break under torch.compile: see run_blocks_eager_under_compile
_decode_block_eager = torch.compiler.disable(DecodeBlock.forward)


def run_blocks_eager_under_compile(model: torch.nn.Module) -> None:
    """Make a model's DecodeBlocks run their batch-1 step eager inside torch.compile (a graph break each),
    so that their kernels launch with kv_attention.PDL while the compiler fuses what surrounds them
    (generate.Generator with --compile and PDL; the whole step is then one CUDAGraphStep). Measured on the
    H200 (2026-12-05): SmolLM2-135M 0.629 -> 0.504 ms a step. Mixture-of-experts blocks ran eager then
    with their router pick and weighted sum as ATen kernels and lost (12 Qwen3 layers 0.887 -> 1.168 ms);
    eager with PDL, a float MoE block now runs route and expert_down_mix instead: 0.870 ms (0.873 with
    Inductor's PDL alone; 2026-12-05, second session), so it is included; int8 experts
    (quantize.Int8Experts) are not. Nor is a block whose cache has no attention kernel of ours (attend is
    then flex_attention, which only the compiler makes a kernel of: eager it is math, with host copies that
    a CUDA graph capture refuses). Called after the caches are made (Generator.setup)."""
    for module in model.modules():
        if type(module) is DecodeBlock:
            ffn = module.feed_forward
            eager_ffn = (
                type(ffn) is FeedForward or EXPERT_GEMV_ENABLED and type(ffn.experts) in (Experts, DownMixExperts)
            )
            module.eager_under_compile = eager_ffn and module.attention.kv_cache.attends_at_decode()


def project(linear: torch.nn.Module, x: torch.Tensor, **folded) -> torch.Tensor:
    """One row through a bias-free float nn.Linear or quantize.Int8Linear (its int8 weight and
    per-row scales), with what DecodeBlock folds in."""
    return decode_gemv(x, linear.weight, getattr(linear, "scales", None), **folded)


def fusable_block(block: torch.nn.Module) -> bool:
    """A block whose projections are float nn.Linears or quantize.Int8Linears, without hooks (tensor
    parallel's all-reduces are forward hooks on wo and w2: the fused path would skip them) and without
    biases past wqkv's; a mixture of experts keeps its own feed-forward."""
    if type(block) is not TransformerBlock or type(block.feed_forward) not in (FeedForward, MoEFeedForward):
        return False
    if type(block.attention_norm) is not RMSNorm or type(block.ffn_norm) is not RMSNorm:
        return False
    a, f = block.attention, block.feed_forward
    linears = (a.wqkv, a.wo) + ((f.w13, f.w2) if type(f) is FeedForward else ())
    return (
        all(foldable_linear(m) for m in linears)
        and not f._forward_hooks
        and not f._forward_pre_hooks
        and all(m.bias is None for m in linears[1:])
        and available(a.wo.weight)
    )


def foldable_linear(linear: torch.nn.Module) -> bool:
    """A float nn.Linear or a quantize.Int8Linear that project() can run: contiguous (decode_gemv would
    copy a strided weight every step), without hooks (tensor parallel's all-reduces are forward hooks:
    the folded path would skip them)."""
    from quantize import Int8Linear  # quantize imports this file

    float_linear = type(linear) in (torch.nn.Linear, DecodeLinear) and linear.weight.is_floating_point()
    return (
        (float_linear or type(linear) is Int8Linear)
        and linear.weight.is_contiguous()
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
    )


def fused_by_default(block: TransformerBlock) -> bool:
    """An int8 block, or a float one no wider than FUSED_FLOAT_MAX_DIM (see FUSED_DECODE)."""
    from quantize import Int8Linear  # quantize imports this file

    return type(block.attention.wqkv) is Int8Linear or block.attention.wqkv.in_features <= FUSED_FLOAT_MAX_DIM


def use_decode_kernels(model: torch.nn.Module) -> None:
    """Give a model on a GPU this file's float decode kernels (generate.Generator.setup calls this,
    before any step is traced): its float blocks become DecodeBlock, its float experts DownMixExperts,
    its float nn.Linears DecodeLinear. The class changes in place, so the parameters are not copied;
    quantized linears (quantize.py's) and everything on the CPU stay as they are; int4 blocks are
    quantize.use_int4_decode_blocks' to pick (unless FASTGEN_INT4_FOLD=0)."""
    from quantize import use_int4_decode_blocks  # quantize imports this file

    for module in model.modules():
        if fusable_block(module) and fused_by_default(module):
            module.__class__ = DecodeBlock
        elif type(module) is Experts and available(module.w2):
            module.__class__ = DownMixExperts
        elif type(module) is torch.nn.Linear and float_on_gpu(module.weight):
            module.__class__ = DecodeLinear
    use_int4_decode_blocks(model)


def float_on_gpu(weight: torch.Tensor) -> bool:
    """A float weight this file's kernels can read (decode_linear's)."""
    return available(weight) and weight.is_floating_point()
