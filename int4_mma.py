"""Int4Linear's decode product (1-8 rows) on a GPU as a CUDA kernel on tensor cores: the default where nvcc builds it.

tinygemm (aten._weight_int4pack_mm) and a Triton GEMV (~3.4 sm_90 instructions a weight; lost, removed) both take
~2.78 ms a Llama-3-8B int4-g64 step on an H100, 47% of copy bandwidth; issue 10 wants 450 tok/s (2.22 ms).
tinygemm's packed layout, [N / 8, K / 128, 32 lanes, 4 words] for 8 inner k tiles, is mma.m16n8k16's A fragment:
lane 4 g + t of an 8-row tile holds, in word i, row g's k = 32 i + 2 t + 8 j (+1) at nibbles j (4 + j). So this
kernel feeds a word's nibble pairs straight to the tensor cores, two 8-row tiles an mma (rows 0-7, 8-15) with x as
B: one lop3 a pair puts q under bf16 128's exponent (128 + q, exact), the tensor cores sum (128 + q) x in fp32,
and each group's scale and zero are applied after: y += scale (D - 136 X) + zero X, X the group's sum of x (an
mma of ones by x). tinygemm rounds each dequantized weight to bf16 first; this keeps fp32 to the end (the two
differ by ~3e-3 relative). sm_90 loop (scripts/int4_mma_probe.py --sass): 1.7-2.0 instructions a weight.
H100 (2026-12-06, thirteenth session), each linear alone, L2 flushed, Llama-3-8B's four projections x 32 layers:
group 64 2.485 ms against tinygemm's 3.032, group 128 2.322 against 2.905; the whole int4-g64 step 2.364 ms replayed
against tinygemm's 2.768 (2026-12-06, fourteenth session; 8 rows a pass: 3.39 ms against 5.40, each linear alone).

CUDA C++ rather than Triton: the weight must land in the mma's registers as it was loaded, which Triton's
tl.dot cannot be told (a Triton tensor-core form moved its tiles through shared memory: 6.6-8.8 instructions a
weight). Built on first use with torch's load_inline, which needs nvcc (the CUDA toolkit) on the machine.

Also here: the one-row folds quantize.Int4DecodeBlock runs (on by default, FASTGEN_INT4_FOLD=0 turns them off:
RMSNorm, RoPE and the cache write, SiLU(gate) * up and the residual adds in the kernel; the fold section at the end)
and the kernels' programmatic dependent launch on sm_90+ (on by default, FASTGEN_INT4_PDL=0 turns it off).
"""

import os
import sys

import torch

from errors import FastgenError, first_line
from model import rms_norm, rope_cos_sin

# FASTGEN_INT4_MMA: unset, Int4Linear's CUDA calls of up to MAX_ROWS rows go through int4_mma_gemv where nvcc builds
# the kernel, and stay on tinygemm (with one warning) where it cannot; "1" makes a failed build an error; "0" keeps
# tinygemm and builds nothing.
MODE = os.environ.get("FASTGEN_INT4_MMA", "auto")
ENABLED = MODE != "0"
GROUPS = (32, 64, 128)  # whole groups in a 128-k supertile (Int4Linear's 256 stays on tinygemm)
TILES = 2  # row tiles (8 rows) a block: two make one mma; the H100 probe found 2 best at every shape
WARPS = (4, 8, 16)  # the builds (the folds: 8 and 16; 4 is the output head's at one row, config())
FOLD_WARPS = (8, 16)
# Rows of x one pass over the weight takes (B's 8 columns). H100, Llama-3-8B's four projections x 32 layers at 8
# rows, each alone: 3.39 ms (g64) / 2.92 (g128) against tinygemm's 5.40 / 5.40, which reads the weight again per
# 16-row tile's work (int4_mma_probe.py --rows 8, 2026-12-06). Prefill's longer x stays on tinygemm.
MAX_ROWS = 8


def config(n: int, k: int, rows: int = 1) -> dict:
    """Warps a block: the H100 probe (2026-12-06, Llama-3-8B's shapes, 4 / 8 / 16 warps at 2 tiles): 16 where the
    grid is small (wo, w2: 4096 rows, 256 blocks), 8 otherwise (wqkv, w13). Its whole grid (2 / 4 tiles, 4-32 warps,
    with and without prefetching each warp's next supertile; 2026-12-06) put these within 1% of the best at every
    projection, at 1 and 8 rows; the 128k-row output head, timed at one row, wanted 4 warps (2357 against 2214 GB/s
    at group 64, 2652 against 2554 at 128: ~8 us a Llama-3 step)."""
    if rows == 1 and n > 65536:
        return dict(tiles=TILES, warps=4, prefetch=False)
    return dict(tiles=TILES, warps=16 if n <= 4096 else 8, prefetch=False)


def applies(x: torch.Tensor, weight: torch.Tensor, groupsize: int) -> bool:
    """The kernel is built, x [rows <= MAX_ROWS, K] on CUDA, weight in tinygemm's layout with 8 inner k tiles
    ([N / 8, K / 128, 32, 4]), a group that fits a supertile."""
    return (
        ENABLED
        and built()  # at load (Int4Linear.pack_ calls build())
        and x.is_cuda
        and x.shape[0] <= MAX_ROWS
        and groupsize in GROUPS
        and weight.dim() == 4
        and weight.shape[2:] == (32, 4)
        and x.shape[1] == 128 * weight.shape[1]
    )


KERNEL = r"""
#include <cuda_bf16.h>
#include <stdint.h>

// 128 + q for the two nibbles of a word at bits 0-3 (even k) and 16-19 (odd k): bf16x2 under 128's exponent
__device__ __forceinline__ uint32_t biased_pair(uint32_t word) {
    uint32_t v;
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(v) : "r"(word), "r"(0x43004300u));
    return v;
}

// d = A B (+ c): A rows 0-7 one tile's weights, rows 8-15 another's (a0 / a1: k 2t..2t+1, a2 / a3: k 2t+8..2t+9
// of the k16 step); B's columns all x (b0: k 2t..2t+1, b1: k 2t+8..2t+9), so every column of D is the same
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1, bool first) {
    if (first)
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%10,%10,%10,%10};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
    else
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bf16_low(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_high(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
    __nv_bfloat162 p = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&p);
}

// What a block does around its sums (FOLD). PLAIN stores y = x W^T. RESIDUAL stores y + residual. NORM_GLU and
// NORM_ROPE (one row of x) take RMSNorm in: each block first writes x times the norm's weight into shared memory
// (the loop then reads it there, at a plain loop's cost) and sums x^2 on the way, and scales its sums by 1 / rms
// after (done in the loop, per supertile, it doubled the loop's sm_90 instructions: 88 -> 167-188). NORM_GLU (w13,
// [gate; up]) pairs tile b of the gate rows with tile b of the up rows (N / 2 further on) and stores SiLU(gate) *
// up [N / 2]. NORM_ROPE (wqkv) pairs a head's rows d and d + D / 2 and stores q rotated (rotate-half RoPE) [Hq D],
// writes k rotated and v into the caches at the token's slot.
constexpr int PLAIN = 0, RESIDUAL = 1, NORM_GLU = 2, NORM_ROPE = 3;
constexpr int MAX_NORM_K = 16384;  // x_normed's 32 KB, with the partial sums within the 48 KB a block gets

struct Fold {
    const uint32_t* norm_weight;    // bf16 pairs [K / 2] (NORM_*)
    const __nv_bfloat16* residual;  // [rows, N] (RESIDUAL)
    const float* inv_freq;          // [D / 2] (NORM_ROPE): RoPE's angle at position p is p inv_freq
    const int32_t* row_start;       // [1]: the token's position is its slot minus row_start
    __nv_bfloat16* k_cache;  // [1, Hkv, cache_len, D]
    __nv_bfloat16* v_cache;
    const int64_t* slot;  // [1]: the token's cache slot
    float eps;
    int head_dim, n_heads, n_kv_heads, cache_len;
};

// y [rows, N] = x [rows, K] . W^T for tinygemm's int4 layout with 8 inner k tiles (w: uint4 [N / 8, S = K / 128,
// 32]), scales and zeros bf16 pairs [K / GROUP, N] (GROUP 32-128: whole groups in a 128-k supertile). A block: T row
// tiles of 8 rows (T even: two tiles an mma), its WARPS warps taking its supertiles in turn. Per group the tensor
// cores sum (128 + q) x in fp32 (exact products; the 128 bias cancels in fp32, not in bf16), and an mma of ones
// by x gives the group's sum of x, X: y += scale (D - 136 X) + zero X = scale D + (zero - 136 scale) X.
// TOKENS 1: one row of x, in every column of B. TOKENS 8: rows (<= 8) of x in B's columns (row g of x in column g,
// the last repeated), D's columns the rows' outputs: one pass over the weight for up to 8 rows.
template <int GROUP, int T, int WARPS, bool PREFETCH, int TOKENS, int FOLD>
__global__ void __launch_bounds__(WARPS * 32) int4_mma_gemv_kernel(
    const uint4* __restrict__ w, const uint32_t* __restrict__ x_pairs, const uint32_t* __restrict__ sz,
    __nv_bfloat16* __restrict__ y, int N, int S, int rows, Fold fold, bool pdl) {
    static_assert(T % 2 == 0, "two row tiles an mma");
    static_assert(TOKENS == 1 || TOKENS == 8, "one row of x, or up to 8 in B's columns");
    constexpr bool NORM = FOLD == NORM_GLU || FOLD == NORM_ROPE;  // and two tiles a block that pair their rows
    static_assert(!NORM || ((T == 2 || (T == 4 && FOLD == NORM_ROPE)) && TOKENS == 1),
                  "the norm folds: one row, one tile pair a block (the RoPE fold: 1 or 2)");
    constexpr int PAIRS = T / 2;  // NORM: tile pairs a block (gate and up tiles, or a head's d and d + D / 2 tiles)
    constexpr int COLS = TOKENS == 1 ? 1 : 2;  // D's columns a lane keeps: 2 t and 2 t + 1 (TOKENS 8)
    constexpr int WORDS_A_GROUP = GROUP / 32, GROUPS_A_SUPERTILE = 128 / GROUP;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, row = lane >> 2;  // row: A's (tile's) row g
    const int tiles = N / 8;
    int tile_ids[T];  // the block's row tiles
    if (FOLD == NORM_GLU) {  // pair p: gate tile b, up tile b (b = block PAIRS + p)
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            tile_ids[2 * p] = blockIdx.x * PAIRS + p;
            tile_ids[2 * p + 1] = tile_ids[2 * p] + tiles / 2;
        }
    } else if (FOLD == NORM_ROPE) {  // pair p: head h's tile j0 + p in each half (D / 16 / PAIRS blocks a head)
        const int half = fold.head_dim / 16, head = blockIdx.x / (half / PAIRS);
        const int j0 = blockIdx.x % (half / PAIRS) * PAIRS;
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            tile_ids[2 * p] = head * 2 * half + j0 + p;
            tile_ids[2 * p + 1] = tile_ids[2 * p] + half;
        }
    } else {
#pragma unroll
        for (int t = 0; t < T; ++t) tile_ids[t] = blockIdx.x * T + t;
    }
    const uint32_t ones = 0x3F803F80u;
    float acc[T][COLS];  // row `row` of each tile; TOKENS 1: every lane of a group of 4 holds the same
#pragma unroll
    for (int t = 0; t < T; ++t)
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[t][c] = 0.f;
    // TOKENS 8: this lane's B column (x's row `row`, the last row past the end)
    const size_t x_row = TOKENS == 1 ? 0 : (size_t)min(row, rows - 1) * S * 64;
    // row `row` of each tile's (scale, zero) pairs, group 0; a tile past the end reads row 0's
    const uint32_t* sz_rows[T];
#pragma unroll
    for (int t = 0; t < T; ++t) sz_rows[t] = sz + (tile_ids[t] * 8 + row < N ? tile_ids[t] * 8 + row : 0);
    const uint4* w_tile[T];  // this lane's words of each tile at supertile 0 (read once: __ldcs, evict first)
#pragma unroll
    for (int t = 0; t < T; ++t)  // a tile past the end reads the last one again; its sums are not stored
        w_tile[t] = w + (size_t)min(tile_ids[t], tiles - 1) * S * 32 + lane;
    // Launched with PDL (pdl, the host's choice), this block may start while the kernel before it finishes: it waits
    // before it reads x or the scales' neighbours. Without PDL the wait returns at once. (An L2 prefetch of the
    // block's whole weight slice before the wait lost: the int4-g64 step 2.266 -> 2.509 ms with it, H100 2026-12-06.)
#if __CUDA_ARCH__ >= 900  // griddepcontrol: sm_90+ (an A100 build has neither, and launches without PDL)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    // PRELOAD: the warp's next supertile's words, loaded before this one's arithmetic (PREFETCH; and always with
    // NORM, whose first weights are then on their way while the block stages x)
    constexpr bool PRELOAD = PREFETCH || NORM;
    uint4 next[T];
    if (PRELOAD && warp < S) {
#pragma unroll
        for (int t = 0; t < T; ++t) next[t] = __ldcs(w_tile[t] + (size_t)warp * 32);
    }
    extern __shared__ uint4 x_normed_words[];  // NORM: x times the norm's weight, bf16 pairs [K / 2]
    uint32_t* x_normed = reinterpret_cast<uint32_t*>(x_normed_words);
    __shared__ float squares[WARPS];  // NORM: each warp's share of the sum of x^2
    if (NORM) {
        // 16 bytes a load, unrolled: the block's loads of x are in flight together (8 dependent 4-byte rounds at K
        // 4096 before: the folds' GEMVs took ~6 us a layer more than plain ones, H100 2026-12-06)
        float x_squares = 0.f;
        const auto stage = [&](uint32_t v, uint32_t g) {
            x_squares = fmaf(bf16_low(v), bf16_low(v), fmaf(bf16_high(v), bf16_high(v), x_squares));
            return mul_bf16x2(v, g);  // bf16, as RMSNorm's output is
        };
        if (((reinterpret_cast<uintptr_t>(x_pairs) | reinterpret_cast<uintptr_t>(fold.norm_weight)) & 15) == 0) {
            const uint4* x_words = reinterpret_cast<const uint4*>(x_pairs);
            const uint4* g_words = reinterpret_cast<const uint4*>(fold.norm_weight);
#pragma unroll 4
            for (int i = threadIdx.x; i < S * 16; i += WARPS * 32) {
                const uint4 v = __ldg(x_words + i), g = __ldg(g_words + i);
                x_normed_words[i] = make_uint4(stage(v.x, g.x), stage(v.y, g.y), stage(v.z, g.z), stage(v.w, g.w));
            }
        } else {  // x a view 4 bytes past a 16-byte boundary
#pragma unroll 4
            for (int i = threadIdx.x; i < S * 64; i += WARPS * 32)
                x_normed[i] = stage(__ldg(x_pairs + i), __ldg(fold.norm_weight + i));
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) x_squares += __shfl_xor_sync(0xFFFFFFFFu, x_squares, offset);
        if (lane == 0) squares[warp] = x_squares;
        __syncthreads();
    }
    for (int s = warp; s < S; s += WARPS) {
        uint4 words[T];
#pragma unroll
        for (int t = 0; t < T; ++t) words[t] = PRELOAD ? next[t] : __ldcs(w_tile[t] + (size_t)s * 32);
        if (PRELOAD && s + WARPS < S) {
#pragma unroll
            for (int t = 0; t < T; ++t) next[t] = __ldcs(w_tile[t] + (size_t)(s + WARPS) * 32);
        }
        uint32_t xb[8][2];  // B for the supertile's 8 k16 steps: x pairs k/2 = 64 s + 8 step + t, and + 4
        const int x_step = s * 64 + (lane & 3);
#pragma unroll
        for (int step = 0; step < 8; ++step) {
            if (NORM) {
                xb[step][0] = x_normed[x_step + step * 8];
                xb[step][1] = x_normed[x_step + step * 8 + 4];
            } else {
                xb[step][0] = __ldg(x_pairs + x_row + x_step + step * 8);
                xb[step][1] = __ldg(x_pairs + x_row + x_step + step * 8 + 4);
            }
        }
#pragma unroll
        for (int g = 0; g < GROUPS_A_SUPERTILE; ++g) {
            const size_t group = (size_t)s * GROUPS_A_SUPERTILE + g;
            float x_sum[4];  // the group's sum of x: [0] column 2 t's, [1] column 2 t + 1's
#pragma unroll
            for (int step = 2 * WORDS_A_GROUP * g; step < 2 * WORDS_A_GROUP * (g + 1); ++step)
                mma(x_sum, ones, ones, ones, ones, xb[step][0], xb[step][1], step == 2 * WORDS_A_GROUP * g);
#pragma unroll
            for (int t = 0; t < T; t += 2) {
                const uint32_t a[4] = {words[t].x, words[t].y, words[t].z, words[t].w};
                const uint32_t b[4] = {words[t + 1].x, words[t + 1].y, words[t + 1].z, words[t + 1].w};
                float d[4];  // d[0] / d[1]: tile t's row `row` (columns 2 t, 2 t + 1), d[2] / d[3]: tile t + 1's
#pragma unroll
                for (int i = WORDS_A_GROUP * g; i < WORDS_A_GROUP * (g + 1); ++i) {
                    // a word's nibbles j / 4 + j: k16 step 2 i + j / 2, k 2t (+ 8 for odd j)
                    mma(d, biased_pair(a[i]), biased_pair(b[i]), biased_pair(a[i] >> 4), biased_pair(b[i] >> 4),
                        xb[2 * i][0], xb[2 * i][1], i == WORDS_A_GROUP * g);
                    mma(d, biased_pair(a[i] >> 8), biased_pair(b[i] >> 8), biased_pair(a[i] >> 12),
                        biased_pair(b[i] >> 12), xb[2 * i + 1][0], xb[2 * i + 1][1], false);
                }
                const uint32_t sz_a = __ldg(sz_rows[t] + group * N), sz_b = __ldg(sz_rows[t + 1] + group * N);
                const float scale_a = bf16_low(sz_a), scale_b = bf16_low(sz_b);
                const float zero_a = fmaf(-136.f, scale_a, bf16_high(sz_a));  // zero - 136 scale
                const float zero_b = fmaf(-136.f, scale_b, bf16_high(sz_b));
#pragma unroll
                for (int c = 0; c < COLS; ++c) {
                    acc[t][c] = fmaf(scale_a, d[c], fmaf(zero_a, x_sum[c], acc[t][c]));
                    acc[t + 1][c] = fmaf(scale_b, d[2 + c], fmaf(zero_b, x_sum[c], acc[t + 1][c]));
                }
            }
        }
    }
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");  // the next kernel may launch (and wait for this one)
#endif
    __shared__ float partial[WARPS][T * 8 * TOKENS];  // [warp][tile row][x row]
    if (TOKENS == 1 ? (lane & 3) == 0 : true) {
#pragma unroll
        for (int t = 0; t < T; ++t)
#pragma unroll
            for (int c = 0; c < COLS; ++c)
                partial[warp][(t * 8 + row) * TOKENS + (TOKENS == 1 ? 0 : 2 * (lane & 3) + c)] = acc[t][c];
    }
    __syncthreads();
    if (!NORM) {
        for (int r = threadIdx.x; r < T * 8 * TOKENS; r += WARPS * 32) {
            float sum = 0.f;
#pragma unroll
            for (int v = 0; v < WARPS; ++v) sum += partial[v][r];
            const int n = blockIdx.x * T * 8 + r / TOKENS, token = r % TOKENS;
            if (FOLD == RESIDUAL && n < N && token < rows)
                sum += __bfloat162float(fold.residual[(size_t)token * N + n]);
            if (n < N && token < rows) y[(size_t)token * N + n] = __float2bfloat16(sum);
        }
        return;
    }
    float total = 0.f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) total += squares[v];
    const float inv_rms = rsqrtf(total / (S * 128) + fold.eps);  // x unpadded: K is the norm's width
    for (int i = threadIdx.x; i < PAIRS * 8; i += WARPS * 32) {  // row r of pair p's two tiles
        const int p = i / 8, r = i % 8;
        float a = 0.f, b = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) {
            a += partial[v][2 * p * 8 + r];
            b += partial[v][(2 * p + 1) * 8 + r];
        }
        a *= inv_rms;
        b *= inv_rms;
        if (FOLD == NORM_GLU) {
            y[(blockIdx.x * PAIRS + p) * 8 + r] = __float2bfloat16(a / (1.f + __expf(-a)) * b);
        } else {
            const int D = fold.head_dim, per_head = D / 16 / PAIRS, head = blockIdx.x / per_head;
            const int d = (blockIdx.x % per_head * PAIRS + p) * 8 + r;
            const int n_qk = fold.n_heads + fold.n_kv_heads;
            if (head < n_qk) {  // q or k: x cos + rotate_half(x) sin, the angles of Transformer.forward (bf16 cos, sin)
                const long long position = max(*fold.slot - (long long)fold.row_start[0], 0LL);
                const float angle = (float)position * fold.inv_freq[d];  // d and d + D / 2 share it
                const float c = __bfloat162float(__float2bfloat16(cosf(angle)));
                const float s = __bfloat162float(__float2bfloat16(sinf(angle)));
                const float rotated_a = a * c - b * s;
                b = b * c + a * s;
                a = rotated_a;
            }
            __nv_bfloat16* out = y + (size_t)head * D;  // q
            if (head >= fold.n_heads) {
                const int kv_head = head < n_qk ? head - fold.n_heads : head - n_qk;
                out = (head < n_qk ? fold.k_cache : fold.v_cache) + ((size_t)kv_head * fold.cache_len + *fold.slot) * D;
            }
            out[d] = __float2bfloat16(a);
            out[d + D / 2] = __float2bfloat16(b);
        }
    }
}
"""

LAUNCHER = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>

// pdl: launched with programmatic dependent launch (sm_90+): see the kernel's griddepcontrol
template <int GROUP, int T, int WARPS, bool PREFETCH, int TOKENS, int FOLD>
static void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, torch::Tensor& y,
                   const Fold& fold, bool pdl, cudaStream_t stream) {
    const int N = sz.size(1), S = x.size(1) / 128;
    const int blocks = FOLD == NORM_GLU || FOLD == NORM_ROPE ? N / (8 * T) : (N / 8 + T - 1) / T;
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(WARPS * 32);
    config.dynamicSmemBytes = FOLD == NORM_GLU || FOLD == NORM_ROPE ? S * 128 * 2 : 0;  // x_normed
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = pdl ? 1 : 0;
    const cudaError_t error = cudaLaunchKernelEx(
        &config, int4_mma_gemv_kernel<GROUP, T, WARPS, PREFETCH, TOKENS, FOLD>,
        reinterpret_cast<const uint4*>(w.data_ptr()), reinterpret_cast<const uint32_t*>(x.data_ptr()),
        reinterpret_cast<const uint32_t*>(sz.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N, S,
        static_cast<int>(x.size(0)), fold, pdl);
    TORCH_CHECK(error == cudaSuccess, "int4_mma: launch failed: ", cudaGetErrorString(error));
}

static void check_operands(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8 && x.size(1) % 128 == 0, "x: [1-8, K / 128 * 128]");
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && sz.scalar_type() == torch::kBFloat16, "bf16 x and scales");
    TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && sz.is_contiguous());
    TORCH_CHECK(w.dim() == 4 && w.size(2) == 32 && w.size(3) == 4, "tinygemm's layout with 8 inner k tiles");
    TORCH_CHECK(sz.size(1) % 8 == 0 && w.size(0) == sz.size(1) / 8 && w.size(1) == x.size(1) / 128);
}

// stream: torch.cuda.current_stream().cuda_stream
torch::Tensor int4_mma_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t t,
                            int64_t warps, int64_t prefetch, int64_t pdl, int64_t stream_handle) {
    check_operands(x, w, sz);
    auto y = torch::empty({x.size(0), sz.size(1)}, x.options());
    const int64_t tokens = x.size(0) == 1 ? 1 : 8;  // the kernel's TOKENS
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const Fold fold{};
    DISPATCH
    TORCH_CHECK(false, "int4_mma: no build for group ", group, ", ", t, " tiles, ", warps, " warps, prefetch ",
                prefetch, ", ", x.size(0), " rows");
}

// One row with a FOLD (1 RESIDUAL, 2 NORM_GLU, 3 NORM_ROPE) at t tiles a block (2; the RoPE fold 2 or 4).
// Tensors a fold does not read may be any tensor (x).
torch::Tensor int4_mma_fold(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t t,
                            int64_t warps, int64_t fold_kind, torch::Tensor norm_weight, double eps,
                            torch::Tensor residual, torch::Tensor inv_freq, torch::Tensor row_start,
                            torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot, int64_t n_heads,
                            int64_t pdl, int64_t stream_handle) {
    check_operands(x, w, sz);
    TORCH_CHECK(x.size(0) == 1, "the folds take one row");
    const int64_t N = sz.size(1);
    Fold fold{};
    fold.eps = static_cast<float>(eps);
    torch::Tensor y;
    if (fold_kind == RESIDUAL) {
        TORCH_CHECK(residual.sizes() == torch::IntArrayRef({1, N}) && residual.is_contiguous() &&
                    residual.scalar_type() == torch::kBFloat16, "residual: bf16 [1, N]");
        fold.residual = reinterpret_cast<const __nv_bfloat16*>(residual.data_ptr());
        y = torch::empty({1, N}, x.options());
    } else {
        TORCH_CHECK(norm_weight.numel() == x.size(1) && norm_weight.is_contiguous() &&
                    norm_weight.scalar_type() == torch::kBFloat16, "norm weight: bf16 [K]");
        TORCH_CHECK(x.size(1) <= MAX_NORM_K, "the norm folds hold x in shared memory: K <= ", MAX_NORM_K);
        fold.norm_weight = reinterpret_cast<const uint32_t*>(norm_weight.data_ptr());
    }
    if (fold_kind == NORM_GLU) {
        TORCH_CHECK(N % (8 * t) == 0, "[gate; up]: N / 2 rows each, whole tile pairs");
        y = torch::empty({1, N / 2}, x.options());
    } else if (fold_kind == NORM_ROPE) {
        const int64_t D = k_cache.size(3), n_kv_heads = k_cache.size(1);
        TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && v_cache.sizes() == k_cache.sizes() &&
                    k_cache.scalar_type() == torch::kBFloat16 && v_cache.scalar_type() == torch::kBFloat16 &&
                    k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: bf16 [1, Hkv, S, D]");
        TORCH_CHECK(D % (8 * t) == 0 && N == (n_heads + 2 * n_kv_heads) * D, "wqkv: (Hq + 2 Hkv) D rows, D % 8t == 0");
        TORCH_CHECK(inv_freq.numel() == D / 2 && inv_freq.scalar_type() == torch::kFloat && inv_freq.is_contiguous(),
                    "inv_freq: fp32 [D / 2]");
        TORCH_CHECK(row_start.numel() >= 1 && row_start.scalar_type() == torch::kInt, "row_start: int32 [1]");
        TORCH_CHECK(slot.numel() == 1 && slot.scalar_type() == torch::kLong, "slot: int64 [1]");
        fold.inv_freq = inv_freq.data_ptr<float>();
        fold.row_start = row_start.data_ptr<int32_t>();
        fold.k_cache = reinterpret_cast<__nv_bfloat16*>(k_cache.data_ptr());
        fold.v_cache = reinterpret_cast<__nv_bfloat16*>(v_cache.data_ptr());
        fold.slot = slot.data_ptr<int64_t>();
        fold.head_dim = D;
        fold.n_heads = n_heads;
        fold.n_kv_heads = n_kv_heads;
        fold.cache_len = k_cache.size(2);
        y = torch::empty({1, n_heads * D}, x.options());
    }
    TORCH_CHECK(y.defined(), "int4_mma: fold ", fold_kind, " is none of 1 (residual), 2 (norm, GLU), 3 (RoPE)");
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    FOLD_DISPATCH
    TORCH_CHECK(false, "int4_mma: no build for group ", group, ", ", t, " tiles, ", warps, " warps, fold ", fold_kind);
}
"""

DECLARATION = (
    "torch::Tensor int4_mma_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t t, "
    "int64_t warps, int64_t prefetch, int64_t pdl, int64_t stream_handle);\n"
    "torch::Tensor int4_mma_fold(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t t, "
    "int64_t warps, int64_t fold_kind, torch::Tensor norm_weight, double eps, torch::Tensor residual, "
    "torch::Tensor inv_freq, torch::Tensor row_start, torch::Tensor k_cache, torch::Tensor v_cache, "
    "torch::Tensor slot, int64_t n_heads, int64_t pdl, int64_t stream_handle);"
)


RESIDUAL, NORM_GLU, NORM_ROPE = 1, 2, 3  # the kernel's FOLD (0: PLAIN)
MAX_NORM_K = 16384  # the kernel's: the norm folds hold x (bf16) in shared memory


def fold_tile_builds(kind: int, warps: int) -> tuple[int, ...]:
    """Row tiles a block built for a fold: 2, and 4 for the RoPE fold at 8 warps (the kernel's static_assert)."""
    return (2, 4) if kind == NORM_ROPE and warps == FOLD_WARPS[0] else (2,)


def launcher_source(
    groups=GROUPS, configs=tuple((TILES, w, False) for w in WARPS), tokens=(1, 8), folds=(RESIDUAL, NORM_GLU, NORM_ROPE)
) -> str:
    """The launcher with a case for every (group, (tiles, warps, prefetch), tokens) built, and for every (group, warps
    at 2 tiles, fold) of the one-row folds."""
    cases = "\n".join(
        f"    if (group == {g} && t == {t} && warps == {w} && prefetch == {int(p)} && tokens == {n}) "
        f"{{ launch<{g}, {t}, {w}, {str(p).lower()}, {n}, PLAIN>(x, w, sz, y, fold, pdl, stream); return y; }}"
        for g in groups
        for t, w, p in configs
        for n in tokens
    )
    fold_cases = "\n".join(
        f"    if (group == {g} && t == {t} && warps == {w} && fold_kind == {f}) "
        f"{{ launch<{g}, {t}, {w}, false, 1, {f}>(x, w, sz, y, fold, pdl, stream); return y; }}"
        for g in groups
        for w in sorted({w for _, w, _ in configs} & set(FOLD_WARPS))
        for f in folds
        for t in fold_tile_builds(f, w)
    )
    return LAUNCHER.replace("    DISPATCH", cases).replace("    FOLD_DISPATCH", fold_cases)


def load(name="fastgen_int4_mma", **builds):
    """torch's load_inline of the kernel and its launcher with launcher_source's builds (nvcc, for the GPU it runs on:
    torch reads its compute capability)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        name,
        cpp_sources=DECLARATION,
        cuda_sources=KERNEL + launcher_source(**builds),
        functions=["int4_mma_gemv", "int4_mma_fold"],
        extra_cuda_cflags=["-O3"],
    )


# Programmatic dependent launch of these kernels (kv_attention.PDL's mechanism, sm_90+): each may start while the
# kernel before it finishes, then waits for it; once its main loop is done the next kernel may launch. Inside a
# compiled step too: the custom op launches the kernel itself, and the CUDA graph keeps the attribute. On by default
# (FASTGEN_INT4_PDL=0 turns it off): the int4-g64 step 2.204 -> 2.171 ms replayed, bench.py B1 446.5 -> 451.3 tok/s
# (H100, 2026-12-06, one machine). With an L2 prefetch of each block's weights before the wait it had lost, 2.266 ->
# 2.509 ms with the folds: the prefetch cost more than the overlap gained.
PDL = os.environ.get("FASTGEN_INT4_PDL", "1") == "1"


def launches_with_pdl(x: torch.Tensor) -> int:
    import kv_attention

    return int(PDL and kv_attention.pdl_applies(x.device))


_extension = None
_build_failed = False


def built() -> bool:
    """Has build() made the extension in this process (an int4 model packed for a GPU with nvcc there)?"""
    return _extension is not None


def build():
    """The compiled extension, built once a process (nvcc: ~1 min the first time, then torch's cache under
    ~/.cache/torch_extensions), or None where it cannot build: one warning, and Int4Linear stays on tinygemm.
    FASTGEN_INT4_MMA=1 makes that a one-line error instead."""
    global _extension, _build_failed
    if _extension is None and not _build_failed and ENABLED:
        try:
            _extension = load()
        except Exception as e:  # noqa: BLE001 - no CUDA_HOME, nvcc or ninja; a failed compile: tinygemm does the work
            reason = first_line(e) or type(e).__name__
            if MODE == "1":
                raise FastgenError(
                    f"FASTGEN_INT4_MMA=1 could not build its CUDA kernel ({reason}): it needs nvcc (the CUDA toolkit) "
                    "and ninja; install them or unset FASTGEN_INT4_MMA"
                ) from e
            _build_failed = True
            print(
                f"warning: int4 decode runs on tinygemm, ~17% slower: the tensor-core kernel did not build ({reason}); "
                "install nvcc (the CUDA toolkit) and ninja, or set FASTGEN_INT4_MMA=0 to skip the build",
                file=sys.stderr,
            )
    return _extension


@torch.library.custom_op("fastgen::int4_mma_gemv", mutates_args=())
def int4_mma_gemv(
    x: torch.Tensor, weight: torch.Tensor, groupsize: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x [rows 1-8, K] bf16 (K = the padded in_features), weight int32 [N / 8, K / 128, 32, 4] (tinygemm's, 8
    inner k tiles), scales_and_zeros bf16 [K / groupsize, N, 2] -> [rows, N] bf16: _weight_int4pack_mm's contract
    at up to 8 rows. Launched on the current stream (a CUDA graph's capture stream included)."""
    N, K = scales_and_zeros.shape[1], x.shape[1]
    cfg = config(N, K, x.shape[0])
    stream = torch.cuda.current_stream(x.device).cuda_stream
    return build().int4_mma_gemv(
        x.contiguous(),
        weight,
        scales_and_zeros.contiguous(),
        groupsize,
        cfg["tiles"],
        cfg["warps"],
        int(cfg["prefetch"]),
        launches_with_pdl(x),
        stream,
    )


@int4_mma_gemv.register_fake
def _(x, weight, groupsize, scales_and_zeros):
    return x.new_empty((x.shape[0], scales_and_zeros.shape[1]))


# ----------------------------------------------------------------------------- one row with the block folded in
# Int4DecodeBlock (quantize.py) runs a batch-1 decode step of an int4 block as four of these kernels and the
# attention: the RMSNorms into wqkv's and w13's loops, RoPE and the cache write into wqkv's store, SiLU(gate) * up
# into w13's, the residual adds into wo's and w2's, where Inductor's step had 12 kernels a layer. On by default
# (the int4-g64 Llama-3-8B step 2.328 -> 2.266 ms, H100 2026-12-06); FASTGEN_INT4_FOLD=0 turns it off.
FOLD_ENABLED = os.environ.get("FASTGEN_INT4_FOLD", "1") != "0"
# Row tiles a block for the RoPE fold (wqkv) at 8 warps: 4 (two of a head's d / d + D / 2 tile pairs a block), or 2
# (FASTGEN_INT4_ROPE_TILES=2). Each block stages x and the norm's weight (16 KB at K 4096) from L2; at 4 tiles half the
# blocks do. Llama-3-8B int4-g64, H100 2026-12-06: the step 2.271 -> 2.236 ms at 4 (wqkv 326 -> 297 us of it); w13's
# GLU fold lost at 4 (1032 -> 1105 us) and stays at 2.
ROPE_FOLD_TILES = int(os.environ.get("FASTGEN_INT4_ROPE_TILES", "4"))


def int4_product(x, weight, groupsize, scales_and_zeros) -> torch.Tensor:
    """tinygemm's product on x's device (the CPU kernel takes its own layout): Int4Linear's linear where int4_mma
    does not apply, and the folds' references'."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, weight, groupsize, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, groupsize, scales_and_zeros)


def residual_reference(x, weight, groupsize, scales_and_zeros, residual):
    """x [1, K] -> x W^T + residual [1, N] (the product rounded to bf16 first, as the model's linear returns it)."""
    return int4_product(x, weight, groupsize, scales_and_zeros) + residual


def norm_glu_reference(x, weight, groupsize, scales_and_zeros, norm_weight, eps):
    """x [1, K] -> SiLU(gate) * up [1, N / 2] of w13 = [gate; up] over RMSNorm(x): FeedForward's hidden."""
    from gemv import glu_output

    return glu_output(int4_product(rms_norm(x, norm_weight, eps), weight, groupsize, scales_and_zeros))


def norm_rope_kv_reference(
    x, weight, groupsize, scales_and_zeros, norm_weight, eps, inv_freq, row_start, k_cache, v_cache, slot, n_heads
):
    """x [1, K] -> wqkv over RMSNorm(x), then kv_attention.rope_write_kv_reference at the token's angles (its
    position: slot - row_start, as Transformer.forward takes it): k and v written at slot, q [1, Hq, 1, D] returned."""
    import kv_attention

    qkv = int4_product(rms_norm(x, norm_weight, eps), weight, groupsize, scales_and_zeros)
    cos, sin = rope_cos_sin((slot.view(1) - row_start[:1]).clamp(min=0), inv_freq, x.dtype)
    return kv_attention.rope_write_kv_reference(qkv, cos, sin, k_cache, v_cache, slot, n_heads, None, None, 0.0)


def fold_applies(x: torch.Tensor, weight: torch.Tensor, groupsize: int) -> bool:
    """The folds on (FASTGEN_INT4_FOLD not 0) and int4_mma applies to one bf16 row."""
    return FOLD_ENABLED and x.shape[0] == 1 and x.dtype == torch.bfloat16 and applies(x, weight, groupsize)


def fold_tiles(kind: int, warps: int, head_dim: int) -> int:
    """Row tiles a block for a fold: ROPE_FOLD_TILES where 4 are built (the RoPE fold at 8 warps) and a head's D / 2
    rows split into 16-row pairs, else 2."""
    return ROPE_FOLD_TILES if 4 in fold_tile_builds(kind, warps) and head_dim % 32 == 0 else 2


def _fold(x, weight, groupsize, scales_and_zeros, kind, norm_weight=None, eps=0.0, residual=None, rope=None):
    inv_freq, row_start, k_cache, v_cache, slot, n_heads = rope or (x, x, x, x, x, 0)  # unread where not NORM_ROPE
    n = scales_and_zeros.shape[1]
    warps = max(config(n, x.shape[1])["warps"], FOLD_WARPS[0])  # the folds' builds
    return build().int4_mma_fold(
        x.contiguous(),
        weight,
        scales_and_zeros.contiguous(),
        groupsize,
        fold_tiles(kind, warps, k_cache.shape[-1] if rope else 0),
        warps,
        kind,
        x if norm_weight is None else norm_weight,
        eps,
        x if residual is None else residual,
        inv_freq,
        row_start,
        k_cache,
        v_cache,
        slot,
        n_heads,
        launches_with_pdl(x),
        torch.cuda.current_stream(x.device).cuda_stream,
    )


@torch.library.custom_op("fastgen::int4_mma_residual", mutates_args=())
def int4_mma_residual(
    x: torch.Tensor, weight: torch.Tensor, groupsize: int, scales_and_zeros: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """residual_reference's contract in one kernel (wo, w2: the block's residual adds)."""
    return _fold(x, weight, groupsize, scales_and_zeros, RESIDUAL, residual=residual.contiguous())


@int4_mma_residual.register_fake
def _(x, weight, groupsize, scales_and_zeros, residual):
    return x.new_empty((1, scales_and_zeros.shape[1]))


@torch.library.custom_op("fastgen::int4_mma_norm_glu", mutates_args=())
def int4_mma_norm_glu(
    x: torch.Tensor,
    weight: torch.Tensor,
    groupsize: int,
    scales_and_zeros: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """norm_glu_reference's contract in one kernel (w13 with ffn_norm)."""
    return _fold(x, weight, groupsize, scales_and_zeros, NORM_GLU, norm_weight=norm_weight, eps=eps)


@int4_mma_norm_glu.register_fake
def _(x, weight, groupsize, scales_and_zeros, norm_weight, eps):
    return x.new_empty((1, scales_and_zeros.shape[1] // 2))


@torch.library.custom_op("fastgen::int4_mma_norm_rope_kv", mutates_args=("k_cache", "v_cache"))
def int4_mma_norm_rope_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    groupsize: int,
    scales_and_zeros: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    inv_freq: torch.Tensor,
    row_start: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """norm_rope_kv_reference's contract in one kernel (wqkv with attention_norm; inv_freq fp32 [D / 2], row_start
    int32 [1], caches bf16 [1, Hkv, S, D], slot int64 [1]). The kernel makes the token's angles from the model's
    inv_freq and row_start: under torch.compile a computed cos / sin passed to an op is copied for each call (32
    layers, 64 small buffers), and those buffers are the step's own inputs."""
    rope = (inv_freq, row_start, k_cache, v_cache, slot, n_heads)
    q = _fold(x, weight, groupsize, scales_and_zeros, NORM_ROPE, norm_weight=norm_weight, eps=eps, rope=rope)
    return q.view(1, n_heads, 1, k_cache.shape[-1])


@int4_mma_norm_rope_kv.register_fake
def _(x, weight, groupsize, scales_and_zeros, norm_weight, eps, inv_freq, row_start, k_cache, v_cache, slot, n_heads):
    return x.new_empty((1, n_heads, 1, k_cache.shape[-1]))
