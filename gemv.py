"""Triton GEMVs for decode with int8 and int4 weights: one pass over the quantized weight.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the weight.
Inductor turns `F.linear(x, w_int8.to(bf16)) * scales` into a converted bf16 copy of the weight
plus a cuBLAS GEMV (three weight passes), or into its own reduction kernel at about 45% of copy
bandwidth (measured, BENCHMARKS.md). This kernel reads each int8 weight byte once, converts in
registers and accumulates in fp32. It is a `torch.library.triton_op`, so eager code, CUDA graphs
and torch.compile (fullgraph) all call the same kernel. `int8_gemv_reference` is the plain
PyTorch computation the GPU tests compare it with.

The int4 GEMV reads group-wise int4 weights (tinygemm's convention, quantize.quantize_int4) in a
layout made once at load time by `int4_gemv_layout`: bytes pair group 2p's element e (low nibble)
with group 2p+1's element e (high nibble), so one contiguous byte load feeds two contiguous runs
of x, and each row's (scale, zero) pairs are contiguous. `int4_gemv_reference` dequantizes that
layout with plain PyTorch (the test reference, and the path for prefill-sized inputs).
"""

import torch

try:  # Triton ships with CUDA builds of torch; a CPU-only install has none
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    triton = None


def int8_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, weight [N, K] int8, scales [N] -> [M, N] in x.dtype."""
    return ((x.float() @ weight.float().T) * scales.float()).to(x.dtype)


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# Tile sizes: each program reduces BLOCK_N output rows over K in BLOCK_K steps. Chosen by a sweep
# on an H100 over the Llama-3-8B projections (scripts/gemv_sweep.py, BENCHMARKS.md): longer
# K steps and 8 warps win where there are few rows or a long K (wo, w2), 512/4 elsewhere.
def int8_gemv_config(n: int, k: int) -> dict:
    if k > 4096 or n <= 4096:
        return dict(BLOCK_N=8, BLOCK_K=1024, num_warps=8, num_stages=NUM_STAGES)
    return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=NUM_STAGES)


NUM_STAGES = 3  # Triton's default software pipelining depth


if triton is not None:

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program: BLOCK_N outputs of activation row m
        pid_n, m = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < N
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + cols
            k_ok = k < K
            x = tl.load(x_ptr + m * K + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(
                w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0, eviction_policy="evict_first"
            ).to(tl.float32)  # read once: keep L2 for x
            acc += w * x[None, :]
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = tl.sum(acc, axis=1) * scale
        tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton_op("fastgen::int8_gemv", mutates_args={})
    def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x [M, K] (contiguous), weight [N, K] int8, scales [N] -> [M, N] in x.dtype."""
        M, K = x.shape
        N = weight.shape[0]
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        cfg = int8_gemv_config(N, K)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), M)
        wrap_triton(_int8_gemv_kernel)[grid](x, weight, scales, y, N, K, **cfg)
        return y


# ----------------------------------------------------------------------------- int4


def int4_gemv_layout(packed: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int):
    """The portable int4 format (uint8 [n, k_pad/2], even column in the high nibble; scales_and_zeros
    [k_pad/g, n, 2]) -> the GEMV's layout: uint8 [n, k2/2] where byte p*g + e holds group 2p's
    element e in the low nibble and group 2p+1's in the high one, and (scale, zero) [n, k2/g, 2] bf16.
    k2 is k_pad rounded up to a whole number of group pairs; a padding group has scale and zero 0."""
    n = packed.shape[0]
    q = torch.stack([packed >> 4, packed & 15], dim=-1).view(n, -1)  # uint8 [n, k_pad], values 0..15
    groups = q.shape[1] // groupsize
    pairs = -(-groups // 2)
    sz = scales_and_zeros.to(torch.bfloat16).transpose(0, 1)  # [n, groups, 2]
    if 2 * pairs != groups:
        q = torch.cat([q, q.new_zeros(n, groupsize)], dim=1)
        sz = torch.cat([sz, sz.new_zeros(n, 1, 2)], dim=1)
    q = q.view(n, pairs, 2, groupsize)
    weight = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, pairs * groupsize)
    return weight.contiguous(), sz.contiguous()


def int4_gemv_dequantize(weight: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int, dtype) -> torch.Tensor:
    """The GEMV layout -> the float weight [n, k2] it stands for."""
    n = weight.shape[0]
    q = torch.stack([weight & 15, weight >> 4], dim=2)  # [n, pairs, 2 (low, high), g] after the view below
    q = q.view(n, -1, groupsize, 2).transpose(2, 3).reshape(n, -1, groupsize).to(dtype)  # [n, groups, g]
    scale, zero = scales_and_zeros[..., :1].to(dtype), scales_and_zeros[..., 1:].to(dtype)
    return ((q - 8) * scale + zero).reshape(n, -1)


def int4_gemv_reference(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int):
    """x [M, K] float, layout from int4_gemv_layout -> [M, N] in x.dtype (computed in fp32)."""
    w = int4_gemv_dequantize(weight, scales_and_zeros, groupsize, torch.float32)[:, : x.shape[1]]
    return (x.float() @ w.T).to(x.dtype)


# Tiles: each program reduces BLOCK_N rows over PAIRS group pairs per step (PAIRS * g bytes per row).
def int4_gemv_config(n: int, k: int, groupsize: int) -> dict:
    pairs = max(1, 256 // groupsize)
    return dict(BLOCK_N=8, PAIRS=pairs, num_warps=4, num_stages=NUM_STAGES)


if triton is not None:

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr, w_ptr, sz_ptr, y_ptr, N, K, NUM_PAIRS,
        GROUP: tl.constexpr, PAIRS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n, m = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        pair_in_step = tl.arange(0, PAIRS)
        element = tl.arange(0, GROUP)
        w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * (NUM_PAIRS * GROUP)
        sz_rows = sz_ptr + rows.to(tl.int64)[:, None] * (NUM_PAIRS * 4)  # 2 groups x (scale, zero) per pair
        acc = tl.zeros((BLOCK_N, PAIRS, GROUP), dtype=tl.float32)
        for p0 in range(0, NUM_PAIRS, PAIRS):
            pair = p0 + pair_in_step  # [PAIRS]
            pair_ok = pair < NUM_PAIRS
            byte = pair[:, None] * GROUP + element[None, :]  # [PAIRS, GROUP]
            wb = tl.load(
                w_rows + byte[None], mask=row_ok[:, None, None] & pair_ok[None, :, None], other=0,
                eviction_policy="evict_first",
            ).to(tl.int32)  # fmt: skip
            # nibble -> float without a convert instruction: 2^23 + q has q in its low mantissa bits
            lo = ((wb & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # q - 8
            hi = ((wb >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            k_lo = 2 * pair[:, None] * GROUP + element[None, :]  # [PAIRS, GROUP]
            x_lo = tl.load(x_ptr + m * K + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + m * K + k_lo + GROUP, mask=k_lo + GROUP < K, other=0.0).to(tl.float32)
            sz_mask = row_ok[:, None] & pair_ok[None, :]
            sz_at = sz_rows + pair[None, :] * 4  # [BLOCK_N, PAIRS]
            s_lo = tl.load(sz_at, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
            z_lo = tl.load(sz_at + 1, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
            s_hi = tl.load(sz_at + 2, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
            z_hi = tl.load(sz_at + 3, mask=sz_mask, other=0.0).to(tl.float32)[:, :, None]
            acc += (lo * s_lo + z_lo) * x_lo[None] + (hi * s_hi + z_hi) * x_hi[None]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton_op("fastgen::int4_gemv", mutates_args={})
    def int4_gemv(
        x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int
    ) -> torch.Tensor:
        """x [M, K] (contiguous), layout from int4_gemv_layout -> [M, N] in x.dtype."""
        M, K = x.shape
        N = weight.shape[0]
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        cfg = int4_gemv_config(N, K, groupsize)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), M)
        num_pairs = weight.shape[1] // groupsize
        wrap_triton(_int4_gemv_kernel)[grid](x, weight, scales_and_zeros, y, N, K, num_pairs, GROUP=groupsize, **cfg)
        return y
