"""Decode attention that reads an int8 / fp8 KV cache itself, over each row's valid slots only.

QuantizedKVCache stores K/V as int8 or float8_e4m3fn with one scale per (row, head, slot). Without
this kernel a decode step dequantizes the whole cache into a bf16 copy and attends over that: it
reads more bytes than a bf16 cache would, and the work grows with the allocated slots. Here each
program takes one (row, kv head) and one split of the slots, skips the split's part outside the
row's valid range [row start (or the window's first slot), query slot], converts K/V tiles in
registers and keeps an online softmax; a second small kernel merges the splits (flash decoding).

The same kernel without scales (`decode_attention`, used by `SplitKVCache`, generate.py's bf16
cache) attends over an unquantized cache: faster than flex decoding at every length measured.

`quantized_decode_attention_reference` is the plain PyTorch computation (dequantize, dense mask,
fp32 softmax) that the GPU tests compare the kernel with.

`rope_write_kv` (gemv.DecodeBlock's batch-1 step) does what precedes the attention in one kernel:
the query/key norms (Qwen3), RoPE, and the write of the token's k and v into the cache.
"""

import functools
import os

import torch

from model import KVCache, rotate_half, valid_kv, write_slots

try:  # Triton ships with CUDA builds of torch; a CPU-only install has none
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton = None

BLOCK_N = 64  # kv slots per tile
MAX_SPLITS = 64
# (row, kv head, split) programs to aim for, from scripts/kv_kernel_sweep.py on the H200 (2026-12-03,
# BENCHMARKS.md): a bf16 cache is fastest at 256 (B8 8k filled 78.1 -> 68.3 us, B1 8k of 32k 14.2 ->
# 11.9 us against 512); an int8 one wants 512 (its conversions need more programs in flight: 61.5 us
# against 70.9 at 256).
TARGET_PROGRAMS = 256
TARGET_PROGRAMS_QUANTIZED = 512
NUM_WARPS, NUM_STAGES = 4, 3  # the split kernel's launch (3 stages: Triton's default on CUDA)
# A cache of at most this many tiles attends in one split a (row, kv head): no merge kernel, the tiles
# read in turn by one program. A cache of one tile always does. Up to 4 tiles was the default from the sixth session
# (H100, 2026-12-05: Qwen3-30B-A3B bf16 batch 1 293.0 / 292.9 -> 295.2 / 294.9 tok/s), a merge launch a layer fewer
# in the batch-1 chain. Since the token log keeps the GPU busy between steps (2026-12-08, twenty-ninth session, H100,
# one round), that program's tiles in turn are what grows the step with the context: SmolLM2-135M's gaps between
# tokens went 0.35 -> 0.445 ms over 200 new tokens in one split, and stayed at 0.397-0.402 in 4 splits (a tile each)
# and a merge; generate() 2435.3 -> 2491.0 tok/s, bench.py 2449.0 -> 2495.5 (2 splits: 2463.8 / 2451.0), though at
# one valid tile the replayed step is slower (0.385 -> 0.403 ms). So a cache of 2-4 tiles splits now.
# FASTGEN_SINGLE_SPLIT_TILES=4 brings the old form back (Qwen3-30B-A3B and Llama-3-8B not re-timed under this one).
SINGLE_SPLIT_MAX_TILES = int(os.environ.get("FASTGEN_SINGLE_SPLIT_TILES", "1"))
# Attending such a cache's tiles at once (one batched dot of SmolLM2's 4 tiles, a warp a tile, each tile's softmax
# combined after, not a loop whose tiles are a chain) lost on the H100 (2026-12-07): the replayed step 0.395 -> 0.467
# ms, generate() 2330 -> 2082 tok/s. Removed (3217aad has it). Loading the one split's first tile before the PDL
# wait (all but the query's own slot, which the kernel before writes, put in after it; EARLY_TILE) tied or lost on
# the H100 (2026-12-07, twenty-sixth session, alternating): generate() 2370.6 / 2383.4 -> 2359.4 / 2368.8 tok/s,
# replayed 0.383 -> 0.384-0.386 ms, the kernel's sum 87.2 -> 91.8 us a step; its GPU tests passed. Removed
# (cbb1f43 has it). Why, not measured: the tile likely hits L2, so its load after the wait cost no more than q's.
# Such a cache's program reads its valid tiles one after another, 64 slots each. Reading it in one or two
# wider tiles (128 / 256 slots, 8-16 warps, 2 stages) lost in bench.py's SmolLM2 on the H100 (2026-12-06):
# 2265.9 tok/s with 64-slot tiles, 2215.9 with 128, 2158.1 with 256. Removed. Narrower tiles lost too (H100,
# 2026-12-07, twenty-eighth session, alternating twice; 2f10e12 has the switch): generate() 2390.2 / 2375.1 tok/s with
# 64 slots, 2294.1 / 2283.4 with 32, 2085.7 / 2076.8 with 16, though fewer slots past the query's are read (148 a
# head on average at 64, 131 at 32, 123 at 16) and the replayed step at one tile went 0.384 -> 0.378 ms at 32: the
# context's growth costs a tile, not a slot.
# The tile's two products as fp32 multiply-and-sum over a [G_PAD, BLOCK, D] block (G padded to 4, not tl.dot's 16)
# instead of tensor-core dots: not worth device time (2026-12-07, compile_kernels.py on the CPU, SmolLM2's one split
# with PDL): the dots' loop is 272 sm_90 instructions a 64-slot tile at 69 registers; the sums' 3188 at 255
# registers and 208 bytes of spills (shuffle trees: 670 SHFL.BFLY), 1596 at 32-slot tiles, 847 at 32 slots and 8 warps.
# Kernels take no masks where every element of a tile is valid: the split-KV attention over the tiles between
# a row's first and last (those two keep theirs; caches of WHOLE_TILES_MIN_PER_SPLIT tiles a split or more), and
# gemv's batch-1 GEMVs over int8 weights whose tiles divide the weight. sm_90 loops (compile_kernels.py --loop):
# the attention over an int8 cache 898 -> 806 instructions, bf16 407 -> 309, at no loss of programs an SM. On an
# H100 (2026-12-05, ninth session): Llama-3-8B B8 with 8k filled, int8 cache, 8.133 -> 7.813 ms a step (the
# attention 60.5 -> 55.9 us a layer), int8 weights B1 3.789 -> 3.303 ms. FASTGEN_WHOLE_TILES=0 masks every tile.
WHOLE_TILES = os.environ.get("FASTGEN_WHOLE_TILES", "1") == "1"
WHOLE_TILES_MIN_PER_SPLIT = 8  # over 1-2 tiles a split the unmasked loop's setup cost SmolLM2 0.3 us a call


def _tag_compile_cache_with_switches() -> None:
    """Inductor's FX graph cache keys a compiled graph by its ops, not by what our ops (triton_op) read when
    traced: the FASTGEN_* switches pick the kernels and constants a graph holds, so a run with one switch set
    could load the graph a run without it compiled (an H100, 2026-12-05: an A/B of FASTGEN_WHOLE_TILES timed
    the same kernels twice, and a KV cache test compared against another form's compile). The switches'
    values go into torch.compile's cache key tag."""
    switches = ",".join(f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith("FASTGEN_"))
    config = getattr(torch.compiler, "config", None)
    if switches and config is not None and hasattr(config, "cache_key_tag"):
        config.cache_key_tag = ";".join(t for t in (config.cache_key_tag, switches) if t)


_tag_compile_cache_with_switches()


# On by default since the H200 run of 2026-12-02 (BENCHMARKS.md): B8 at 8k filled 6.55 ms/step against
# 16.8 ms dequantizing and 7.64 ms for a bf16 cache. FASTGEN_KV_KERNEL=0 turns it off (the dequantized
# path), for comparing.
ENABLED = os.environ.get("FASTGEN_KV_KERNEL", "1") == "1"


# The same kernel over an unquantized (bf16/fp16) cache. Measured on the H200 (BENCHMARKS.md,
# 2026-12-02, third session) against flex decoding, Llama-3-8B shape: 4.663 against 4.886 ms/step
# at short context, 5.788 against 5.942 at 8k filled in a 32k cache, 7.173 against 7.643 at batch 8
# with 8k filled; SmolLM2-135M 0.939 against 0.998. On by default: generate.py's bf16 caches are
# SplitKVCache. FASTGEN_DECODE_KERNEL=0 gives flex decoding back, for comparing.
UNQUANTIZED_ENABLED = os.environ.get("FASTGEN_DECODE_KERNEL", "1") == "1"

# An fp8 cache under bf16 queries, converted to bf16 without F2F: e4m3 -> fp16 by cvt two at a time, fp16 ->
# fp32 (HADD2.F32), and each fp32's top half is its bf16 (exact: an e4m3 value has 4 significant bits), so the
# conversion pipe runs one instruction a pair, not three. Triton's own form (e4m3 -> fp16 -> bf16) holds 128
# F2F.BF16.F16 and 64 F2FP.F16.E4M3 a tile a thread in its sm_90 loop (compile_kernels.py --loop), int8's
# none; this one 64. Everything else is the int8 cache's form: the tile crosses into the dot's layout a byte
# at a time (the asm is pure, so Triton converts after that trip), 3 stages, bf16 dots. H100 (2026-12-06, twelfth
# session), Llama-3-8B B8 with 8k filled: 8.538 -> 8.041 ms replayed (int8's cache ~8.0), and in bench.py the fp8
# cache went from 1.088x to 1.121x the bf16 cache (issue 10 wants 1.1x); short context unchanged (B8 1265.8 vs
# 1264.5 tok/s). On by default; FASTGEN_KV_FP8_VIA_F32=0 gives Triton's conversion back, for comparing.
# (Tiles converted to fp16 with fp16 dots, KV_TILES_FP16, gained nothing on an H200 and lost twice on an H100,
# int8 67.2 vs 56.9 us a layer, fp8 8.374 vs 8.041 ms a step, and was removed: that attention is not bound by its
# instructions.)
KV_FP8_VIA_F32 = os.environ.get("FASTGEN_KV_FP8_VIA_F32", "1") == "1"
KV_ASM = True  # the PTX conversion; False: Triton's own (the interpreter has no inline PTX)

# Programmatic dependent launch (sm_90+) for the batch-1 decode chain's kernels (these attention
# kernels, rope_write_kv, gemv.decode_gemv): each is launched with the attribute that lets it start
# while the kernel before it in the stream finishes, and waits (griddepcontrol.wait) before it touches
# anything another kernel may write; decode_gemv first asks L2 for its first weight tile, which no
# kernel writes. A kernel that has finished its main loop lets the next one launch. In a CUDA graph
# the launch gap and ramp between dependent kernels (~150 a SmolLM2-135M step, 0.693 ms) is what
# this hides. Only where this repo launches the kernel itself (Inductor launches user kernels without the
# attribute, torch 2.11-2.14): eager, so with --compile the batch-1 blocks run eager inside the compiled
# step (generate.Generator, gemv.run_blocks_eager_under_compile). On by default since 2026-12-05's second
# session (SmolLM2-135M 0.629 -> 0.486 ms a step on an H200 with Inductor's PDL too, BENCHMARKS.md);
# FASTGEN_PDL=0 turns it off.
PDL = os.environ.get("FASTGEN_PDL", "1") == "1"


def available(q: torch.Tensor) -> bool:
    return ENABLED and triton is not None and q.is_cuda


def pdl_launch(x: torch.Tensor) -> dict:
    """What a PDL-capable kernel's launch on x's device adds: its PDL constexpr, and with it on,
    Triton's launch_pdl option (the launch attribute). On only with PDL, on sm_90+, and where the
    kernel is launched here, not traced: Inductor would take launch_pdl for a kernel argument."""
    from torch._library.triton import is_wrap_triton_enabled  # True while torch.compile traces the op

    if not (PDL and x.is_cuda and not is_wrap_triton_enabled() and _nvidia_sm90_or_later(x.device.index)):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


def pdl_applies(device: torch.device) -> bool:
    """Whether this repo's kernels launch with PDL on this device (generate.Generator compiles around
    the batch-1 blocks only then: on older GPUs and CPUs a graph break would buy nothing)."""
    return PDL and device.type == "cuda" and _nvidia_sm90_or_later(device.index)


def _nvidia_sm90_or_later(index: int | None) -> bool:
    # griddepcontrol is PTX: not on ROCm, whose "cuda" devices report their gfx version as the capability
    return torch.version.hip is None and _compute_capability(index) >= 9


@functools.cache
def _compute_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


class SplitKVCache(KVCache):
    """An unquantized KVCache whose decode (T = 1, CUDA) attends through this file's kernel."""

    def attends_at_decode(self) -> bool:
        return triton is not None and self.k_cache.is_cuda

    def attend_at_decode(self, q, row_start, q_slot, sliding_window: int | None):
        """q [B, Hq, 1, D] at slot q_slot [1] over each row's valid slots -> [B, Hq, 1, D]."""
        return decode_attention(q, self.k_cache, self.v_cache, row_start, q_slot, sliding_window or 0)


def quantized_decode_attention_reference(q, k_cache, k_scale, v_cache, v_scale, row_start, q_slot, sliding_window):
    """q [B, Hq, 1, D]; caches [B, Hkv, S, D] int8/fp8 (or unquantized, scales None); scales
    [B, Hkv, S, 1]; row_start [B]; q_slot: 1-element tensor, the query's slot. -> [B, Hq, 1, D] in q.dtype."""
    B, n_heads, _, D = q.shape
    n_kv_heads, S = k_cache.shape[1], k_cache.shape[2]
    k, v = k_cache.float(), v_cache.float()
    if k_scale is not None:
        k, v = k * k_scale.float(), v * v_scale.float()
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    slots = torch.arange(S, device=q.device).view(1, S)
    ok = valid_kv(row_start.view(B, 1), q_slot.view(1, 1), slots, sliding_window)  # [B, S]
    scores = (q.float() @ k.transpose(-1, -2)) * D**-0.5  # [B, Hq, 1, S]
    scores = scores.masked_fill(~ok.view(B, 1, 1, S), float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def rope_write_kv_reference(qkv, cos, sin, k_cache, v_cache, slot, n_heads, q_norm_weight, k_norm_weight, eps):
    """One token of batch 1 (gemv.DecodeBlock's step): qkv [1, (Hq + 2 Hkv) D], wqkv's output; cos,
    sin [D] at its position; caches [1, Hkv, S, D]; slot [1]; the per-head RMSNorm weights [D] (Qwen3)
    or None. Writes the token's k (normed, rotated) and v into the caches at slot and returns q
    (normed, rotated) [1, Hq, 1, D] in qkv.dtype: Attention.attend_qkv's steps, in fp32."""
    D, n_kv_heads = k_cache.shape[-1], k_cache.shape[1]
    # [1, H, 1, D] throughout, the layout attention takes (Inductor's CPU flex lowering reads it)
    q, k, v = qkv.float().view(1, -1, 1, D).split([n_heads, n_kv_heads, n_kv_heads], dim=1)

    def norm_rope(x, weight):
        if weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        return x * cos.float().view(D) + rotate_half(x) * sin.float().view(D)

    write_slots(k_cache, slot.view(1), norm_rope(k, k_norm_weight).to(k_cache.dtype))
    write_slots(v_cache, slot.view(1), v.to(v_cache.dtype))
    return norm_rope(q, q_norm_weight).to(qkv.dtype)


def num_splits(batch: int, n_kv_heads: int, cache_len: int, target_programs: int) -> int:
    """Splits of the slot axis per (row, kv head): enough programs to fill the GPU, each at least
    one tile. Static for a cache shape, so a CUDA graph replays the same launch at every length. One
    split (Llama-3-8B from batch 32 over a bf16 cache, 64 over int8; a cache of one tile, or of at most
    SINGLE_SPLIT_MAX_TILES) writes the output itself: no merge kernel."""
    tiles = -(-cache_len // BLOCK_N)
    if tiles <= SINGLE_SPLIT_MAX_TILES:
        return 1
    return max(1, min(MAX_SPLITS, tiles, -(-target_programs // (batch * n_kv_heads))))


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        # launched with PDL, a kernel may run before the previous one has finished: this waits for it
        # (and its memory) before the first read of anything a kernel writes, and before any write
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_launch_next(PDL: tl.constexpr):
        # the next kernel (launched with PDL) may start now: its programs wait in pdl_wait until this
        # kernel has finished
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _norm_rope(
        qkv_ptr, head, head_ok, dims, cos, sin, norm_ptr, D: tl.constexpr, EPS: tl.constexpr, NORM: tl.constexpr
    ):
        # heads `head` [R] of one token's wqkv output, RMSNormed (NORM: Qwen3's per-head q/k norm) and
        # rotated -> fp32 [R, D_PAD]. RoPE's rotate_half pairs dim i with i +- D/2.
        d_ok = dims < D
        partner = tl.where(dims < D // 2, dims + D // 2, dims - D // 2)
        sign = tl.where(dims < D // 2, -1.0, 1.0)
        ok = head_ok[:, None] & d_ok[None, :]
        rows = qkv_ptr + head[:, None] * D
        x = tl.load(rows + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        x_partner = tl.load(rows + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM:
            r = tl.rsqrt(tl.sum(x * x, axis=1) / D + EPS)[:, None]
            x = x * r * tl.load(norm_ptr + dims, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            x_partner = x_partner * r * tl.load(norm_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        return x * cos[None, :] + sign[None, :] * x_partner * sin[None, :]

    @triton.jit
    def _fp8_tile_to_bf16(w):
        # an e4m3 tile -> bf16, exactly, four values (one 32-bit register) an asm call (KV_FP8_VIA_F32); pure,
        # so Triton converts after the tile's byte-wide trip into the dot's layout, as int8's default does
        return tl.inline_asm_elementwise(
            """
            {
            .reg .b16 lo, hi, h0, h1, h2, h3;
            .reg .b32 p0, p1;
            .reg .f32 f0, f1, f2, f3;
            mov.b32 {lo, hi}, $2;
            cvt.rn.f16x2.e4m3x2 p0, lo;
            cvt.rn.f16x2.e4m3x2 p1, hi;
            mov.b32 {h0, h1}, p0;
            mov.b32 {h2, h3}, p1;
            cvt.f32.f16 f0, h0;
            cvt.f32.f16 f1, h1;
            cvt.f32.f16 f2, h2;
            cvt.f32.f16 f3, h3;
            prmt.b32 $0, f0, f1, 0x7632;
            prmt.b32 $1, f2, f3, 0x7632;
            }
            """,
            "=r,=r,r",
            [w],
            dtype=tl.bfloat16,
            is_pure=True,
            pack=4,
        )

    @triton.jit
    def _attend_tile(
        q,  # [G_PAD, D_PAD]: the row's query heads of one kv head, in the dot's dtype
        acc,  # [G_PAD, D_PAD] fp32: the running softmax's unnormalised output, its max and sum
        running_max,
        running_sum,
        tile,  # BLOCK slots from tile * BLOCK
        row,  # (first, last, kv_rows, slots, dims, qk_scale): the row's valid slots [first, last], its offset in
        # the cache, the tile's slot and dim indices, the scores' scale
        cache,  # (k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, S)
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_SCALES: tl.constexpr,
        FP8_VIA_F32: tl.constexpr,
        WHOLE: tl.constexpr,  # every slot of the tile is valid: no masks but on dims past D
    ):
        # one tile of K/V slots into the running softmax -> (acc, running_max, running_sum)
        first, last, kv_rows, slots, dims, qk_scale = row
        k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, S = cache
        dot_dtype = q.dtype  # the compute dtype; int8 and e4m3 values convert to it exactly
        slot = tile * BLOCK + slots
        offsets = (kv_rows + slot)[:, None] * D + dims[None, :]
        ok = ((slot >= first) & (slot <= last) & (slot < S)) | WHOLE
        tile_ok = ok[:, None] & (dims < D)[None, :]
        # both tiles' loads first, so K's and V's bytes are in flight together
        k = tl.load(k_ptr + offsets, mask=tile_ok, other=0.0)
        v = tl.load(v_ptr + offsets, mask=tile_ok, other=0.0)
        if FP8_VIA_F32:
            k, v = _fp8_tile_to_bf16(k), _fp8_tile_to_bf16(v)
        else:
            k, v = k.to(dot_dtype), v.to(dot_dtype)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        if HAS_SCALES:
            k_scale = tl.load(k_scale_ptr + kv_rows + slot, mask=ok, other=0).to(tl.float32)
            v_scale = tl.load(v_scale_ptr + kv_rows + slot, mask=ok, other=0).to(tl.float32)
            scores = scores * (k_scale * qk_scale)[None, :]
        else:
            scores = scores * qk_scale
        if not WHOLE:
            scores = tl.where(ok[None, :], scores, float("-inf"))  # [G_PAD, BLOCK]
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(p, axis=1)
        # V's per-slot scale folds into the probabilities: sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j
        if HAS_SCALES:
            pv = tl.dot((p * v_scale[None, :]).to(dot_dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(dot_dtype), v, input_precision="ieee")
        return acc * correction[:, None] + pv, new_max, running_sum

    @triton.jit
    def _valid_slots(q_slot_ptr, row_start_ptr, window):
        # a row's valid slots [first, last]: from its start (or the window's first slot) to the query's slot
        last = tl.load(q_slot_ptr).to(tl.int32)
        first = tl.load(row_start_ptr).to(tl.int32)
        if window > 0:
            first = tl.maximum(first, last - window + 1)
        return first, last

    @triton.jit
    def _quantized_decode_kernel(
        q_ptr,  # [B * Hkv * G, D] contiguous: query head h * G + g of row b at row (b * Hkv + h) * G + g
        k_ptr,  # [B * Hkv, S, D] int8 / fp8
        k_scale_ptr,  # [B * Hkv, S]; unread without HAS_SCALES
        v_ptr,
        v_scale_ptr,
        row_start_ptr,  # [B]
        q_slot_ptr,  # [1]: the query's slot (the same for every row)
        acc_ptr,  # [B * Hkv, SPLITS, G_PAD, D_PAD] fp32: each split's unnormalised output
        max_ptr,  # [B * Hkv, SPLITS, G_PAD] fp32: its running max (log2 units)
        sum_ptr,  # [B * Hkv, SPLITS, G_PAD] fp32: its softmax denominator
        y_ptr,  # [B * Hkv * G, D]: the attention output (one split)
        n_kv_heads,
        S,
        window,  # sliding window; 0: none
        D: tl.constexpr,  # head_dim: a constant, so every K/V row load is vectorised
        G: tl.constexpr,
        G_PAD: tl.constexpr,  # >= 16: tl.dot's smallest M
        D_PAD: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        HAS_SCALES: tl.constexpr,  # False: an unquantized cache
        FP8_VIA_F32: tl.constexpr,  # an fp8 cache's tiles to bf16 through fp32 (KV_FP8_VIA_F32)
        PDL: tl.constexpr,  # launched with programmatic dependent launch (kv_attention.PDL)
        WHOLE_TILES: tl.constexpr,  # kv_attention.WHOLE_TILES
    ):
        # head_dim ** -0.5 * log2(e), from the constant D: a float argument would reach the kernel as
        # fp64 under Inductor and promote the scores to fp64
        qk_scale = 1.4426950408889634 / (D**0.5)
        bh, split = tl.program_id(0), tl.program_id(1)
        b = bh // n_kv_heads
        heads, dims, slots = tl.arange(0, G_PAD), tl.arange(0, D_PAD), tl.arange(0, BLOCK)
        g_ok, d_ok = heads < G, dims < D
        kv_rows = bh.to(tl.int64) * S
        # this row's valid slots [first, last], read before the PDL wait: no kernel of this step writes the slot or
        # the row's start (the position moves on after the step's last kernel), and every K/V address hangs on
        # them, so their load is off the chain (SmolLM2-135M 0.388 -> 0.381 ms replayed, generate() +2.1%: H100,
        # 2026-12-07)
        first, last = _valid_slots(q_slot_ptr, row_start_ptr + b, window)
        pdl_wait(PDL)
        # the valid tiles dealt round-robin to the splits (tile t to split t % SPLITS), so every split gets a
        # share of the valid slots whatever their number (contiguous shares of the whole cache left all but a
        # quarter of the programs idle at 8k filled in a 32k cache)
        first_tile, last_tile = first // BLOCK, last // BLOCK
        my_first_tile = first_tile + (split - first_tile % SPLITS + SPLITS) % SPLITS

        q = tl.load(q_ptr + (bh * G + heads)[:, None] * D + dims[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0)

        running_max = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
        # Only the first and the last tile can hold slots outside [first, last]. The split's tiles (my_first_tile,
        # + SPLITS, ... up to last_tile) strictly between them are whole: their loop takes no masks. Then the
        # split's share of the two ends, masked, as a range of 0, 1 or 2 tiles (the running softmax takes tiles
        # in any order). Without WHOLE_TILES, one loop masks every tile.
        row, cache = (first, last, kv_rows, slots, dims, qk_scale), (k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, S)
        first_is_mine = (my_first_tile == first_tile) & WHOLE_TILES
        last_is_mine = (
            (last_tile > first_tile) & (last_tile >= my_first_tile) & ((last_tile - my_first_tile) % SPLITS == 0)
        )
        whole_stop = last_tile if WHOLE_TILES else my_first_tile
        for tile in range(tl.where(first_is_mine, my_first_tile + SPLITS, my_first_tile), whole_stop, SPLITS):
            acc, running_max, running_sum = _attend_tile(
                q, acc, running_max, running_sum, tile, row, cache, D, BLOCK, HAS_SCALES, FP8_VIA_F32,
                WHOLE=True,
            )  # fmt: skip
        if WHOLE_TILES:
            end_start = tl.where(first_is_mine, first_tile, last_tile)
            end_stop = tl.where(last_is_mine, last_tile + 1, tl.where(first_is_mine, first_tile + 1, last_tile))
            end_step = tl.where(first_is_mine & last_is_mine, last_tile - first_tile, 1)
        else:
            end_start, end_stop, end_step = my_first_tile, last_tile + 1, SPLITS
        for tile in range(end_start, end_stop, end_step):
            acc, running_max, running_sum = _attend_tile(
                q, acc, running_max, running_sum, tile, row, cache, D, BLOCK, HAS_SCALES, FP8_VIA_F32,
                WHOLE=False,
            )  # fmt: skip

        pdl_launch_next(PDL)
        if SPLITS == 1:  # one split saw every tile (a big batch, or a cache of one tile): its output is the
            # answer (the merge's arithmetic with one split), so no merge runs
            y = acc / running_sum[:, None]
            y_ok = g_ok[:, None] & d_ok[None, :]
            tl.store(y_ptr + (bh * G + heads)[:, None] * D + dims[None, :], y.to(y_ptr.dtype.element_ty), mask=y_ok)
        else:  # not after a return: Triton keeps stores after a constexpr branch's return in the IR, and
            # torch.compile, taking the partials for written, copied y into each of them (a kernel a layer)
            part = bh * SPLITS + split
            tl.store(max_ptr + part * G_PAD + heads, running_max)
            tl.store(sum_ptr + part * G_PAD + heads, running_sum)
            tl.store(acc_ptr + (part * G_PAD + heads)[:, None] * D_PAD + dims[None, :], acc)

    @triton.jit
    def _merge_splits_kernel(
        acc_ptr,
        max_ptr,
        sum_ptr,
        y_ptr,  # [B * Hkv * G, D]: the attention output, in the compute dtype
        D: tl.constexpr,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # one program per query head (a loop over the splits, one program per kv head, took 22 us a
        # layer at 64 splits on the H200): query head g of (row, kv head) bh, all its splits in one load,
        # each weighted by 2^(its max - the overall max). An empty split has max -inf and weight 0; the
        # query's own slot makes one split non-empty.
        pdl_wait(PDL)
        pdl_launch_next(PDL)
        row = tl.program_id(0)  # (b * Hkv + h) * G + g
        bh, g = row // G, row % G
        splits, dims = tl.arange(0, SPLITS_PAD), tl.arange(0, D_PAD)
        split_ok = splits < SPLITS
        parts = (bh * SPLITS + splits) * G_PAD + g  # [SPLITS_PAD]
        maxes = tl.load(max_ptr + parts, mask=split_ok, other=float("-inf"))
        weight = tl.exp2(maxes - tl.max(maxes, axis=0))
        sums = tl.load(sum_ptr + parts, mask=split_ok, other=0.0)
        total = tl.sum(weight * sums, axis=0)
        accs = tl.load(acc_ptr + parts[:, None] * D_PAD + dims[None, :], mask=split_ok[:, None], other=0.0)
        out = tl.sum(weight[:, None] * accs, axis=0) / total  # [D_PAD]
        tl.store(y_ptr + row * D + dims, out.to(y_ptr.dtype.element_ty), mask=dims < D)

    @triton_op("fastgen::quantized_decode_attention", mutates_args={})
    def quantized_decode_attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        k_scale: torch.Tensor,
        v_cache: torch.Tensor,
        v_scale: torch.Tensor,
        row_start: torch.Tensor,
        q_slot: torch.Tensor,
        sliding_window: int,
    ) -> torch.Tensor:
        """q [B, Hq, 1, D]; caches [B, Hkv, S, D]; scales [B, Hkv, S, 1]; row_start [B]; q_slot [1];
        sliding_window 0 for none. -> [B, Hq, 1, D] in q.dtype."""
        return _split_kv_attention(q, k_cache, k_scale, v_cache, v_scale, row_start, q_slot, sliding_window, True)

    @triton_op("fastgen::decode_attention", mutates_args={})
    def decode_attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        row_start: torch.Tensor,
        q_slot: torch.Tensor,
        sliding_window: int,
    ) -> torch.Tensor:
        """The same over an unquantized cache (bf16/fp16/fp32, any dtype q's converts to)."""
        return _split_kv_attention(q, k_cache, k_cache, v_cache, v_cache, row_start, q_slot, sliding_window, False)

    def _split_kv_attention(
        q,
        k_cache,
        k_scale,
        v_cache,
        v_scale,
        row_start,
        q_slot,
        sliding_window,
        has_scales,
    ):
        """The split kernel, then the merge unless one split saw every tile; without has_scales the scale
        arguments are any tensors, never read."""
        n_kv_heads, S, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        B, n_heads = q.shape[0], q.shape[1]
        G = n_heads // n_kv_heads
        G_PAD, D_PAD = max(16, triton.next_power_of_2(G)), triton.next_power_of_2(D)  # >= 16: tl.dot's smallest M
        splits = num_splits(B, n_kv_heads, S, TARGET_PROGRAMS_QUANTIZED if has_scales else TARGET_PROGRAMS)
        y = torch.empty((B, n_heads, 1, D), dtype=q.dtype, device=q.device)
        if splits == 1:  # the split writes y itself: no partials. The kernel has no partial stores at SPLITS 1,
            # so the compiler takes none of these pointers for written and q stands in for all three (the repo's
            # convention for an unread pointer: no allocation)
            acc = running_max = running_sum = q
        else:
            parts = (B * n_kv_heads, splits, G_PAD)
            acc = torch.empty((*parts, D_PAD), dtype=torch.float32, device=q.device)
            running_max = torch.empty(parts, dtype=torch.float32, device=q.device)
            running_sum = torch.empty(parts, dtype=torch.float32, device=q.device)
        fp8_via_f32 = (  # the PTX form, for e4m3 under bf16 queries only
            KV_FP8_VIA_F32 and KV_ASM and (k_cache.dtype, q.dtype) == (torch.float8_e4m3fn, torch.bfloat16)
        )
        wrap_triton(_quantized_decode_kernel)[(B * n_kv_heads, splits)](
            q.contiguous(),
            k_cache,
            k_scale,
            v_cache,
            v_scale,
            row_start,
            q_slot,
            acc,
            running_max,
            running_sum,
            y,
            n_kv_heads,
            S,
            sliding_window,
            D=D,
            G=G,
            G_PAD=G_PAD,
            D_PAD=D_PAD,
            BLOCK=BLOCK_N,
            SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
            HAS_SCALES=has_scales,
            FP8_VIA_F32=fp8_via_f32,
            WHOLE_TILES=WHOLE_TILES and -(-S // BLOCK_N) >= WHOLE_TILES_MIN_PER_SPLIT * splits,
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
            **pdl_launch(q),
        )
        if splits == 1:  # nothing to merge
            return y
        wrap_triton(_merge_splits_kernel)[(B * n_heads,)](
            acc,
            running_max,
            running_sum,
            y,
            D=D,
            G=G,
            G_PAD=G_PAD,
            D_PAD=D_PAD,
            SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
            num_warps=4,
            **pdl_launch(q),
        )
        return y

    @triton.jit
    def _rope_write_kv_kernel(
        qkv_ptr,  # [(Hq + 2 Hkv) D]: one token's wqkv output
        cos_ptr,  # [D]
        sin_ptr,  # [D]
        q_ptr,  # [Hq, D]: the rotated query, out
        k_ptr,  # [Hkv, S, D]: the cache, written at slot
        v_ptr,
        slot_ptr,  # [1]
        q_norm_ptr,  # [D]: per-head RMSNorm weights (QK_NORM)
        k_norm_ptr,
        S,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        EPS: tl.constexpr,
        QK_NORM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # one program per head: a query head is normed, rotated and returned; a kv head's k is normed,
        # rotated and written to the cache with its v
        pdl_wait(PDL)
        pdl_launch_next(PDL)
        head = tl.program_id(0)
        dims = tl.arange(0, D_PAD)
        ok = dims < D
        cos = tl.load(cos_ptr + dims, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + dims, mask=ok, other=0.0).to(tl.float32)
        one = head + tl.arange(0, 1)  # [1]: _norm_rope takes rows of heads
        if head < HQ:
            y = _norm_rope(qkv_ptr, one, one >= 0, dims, cos, sin, q_norm_ptr, D, EPS, QK_NORM)
            tl.store(q_ptr + head * D + dims[None, :], y.to(q_ptr.dtype.element_ty), mask=ok[None, :])
        else:
            y = _norm_rope(qkv_ptr, one, one >= 0, dims, cos, sin, k_norm_ptr, D, EPS, QK_NORM)
            j = head - HQ
            row = (j * S + tl.load(slot_ptr)).to(tl.int64) * D
            tl.store(k_ptr + row + dims[None, :], y.to(k_ptr.dtype.element_ty), mask=ok[None, :])
            v = tl.load(qkv_ptr + (HQ + HKV + j) * D + dims, mask=ok, other=0.0)
            tl.store(v_ptr + row + dims, v.to(v_ptr.dtype.element_ty), mask=ok)

    @triton_op("fastgen::rope_write_kv", mutates_args={"k_cache", "v_cache"})
    def rope_write_kv(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot: torch.Tensor,
        n_heads: int,
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:
        """rope_write_kv_reference's contract in one kernel (qkv, cos, sin contiguous)."""
        n_kv_heads, S, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        q = torch.empty((1, n_heads, 1, D), dtype=qkv.dtype, device=qkv.device)
        wrap_triton(_rope_write_kv_kernel)[(n_heads + n_kv_heads,)](
            qkv,
            cos,
            sin,
            q,
            k_cache,
            v_cache,
            slot,
            cos if q_norm_weight is None else q_norm_weight,  # never read without QK_NORM
            cos if k_norm_weight is None else k_norm_weight,
            S,
            HQ=n_heads,
            HKV=n_kv_heads,
            D=D,
            D_PAD=triton.next_power_of_2(D),
            EPS=eps,
            QK_NORM=q_norm_weight is not None,
            num_warps=1,
            **pdl_launch(qkv),
        )
        return q
