"""Issue 10's int4 target (450 tok/s at batch 1): a probe of a CUDA int4 GEMV on tensor cores, not yet wired in.

    python scripts/int4_mma_probe.py --sass   # no GPU: nvcc's sm_90 machine code, instructions a weight
    python scripts/int4_mma_probe.py          # on a GPU (~2 min: nvcc builds the extension once): checks the
                                              #   kernel against tinygemm, then GB/s beside tinygemm and gemv.int4_gemv

Why: tinygemm (aten._weight_int4pack_mm) and gemv.int4_gemv (Triton, ~3.4 sm_90 instructions a weight) both take
~2.78 ms a Llama-3-8B int4-g64 step on an H100, 47% of copy bandwidth; 450 tok/s needs 2.22 ms. tinygemm's packed
layout, [N / 8, K / 128, 32 lanes, 4 words] for 8 inner k tiles, is mma.m16n8k16's B fragment: lane 4 r + c of
an 8-row tile holds, in word i, row r's k = 32 i + 2 c + 8 j (+1) at nibbles j (4 + j). So this kernel dequantizes
a word's nibble pairs straight into B registers (lop3 under bf16 128's exponent, one bf16x2 fma to q - 8, one to
(q - 8) * scale + zero: tinygemm's formula) and runs one mma per k16 step with the token in row 0 of A (lanes 0-3
hold x; rows 1-15 are zero: the tensor cores do 16x the work, which they have to spare at one token). Per word of
8 weights: 3 shifts, 4 lop3, 8 fma, 2 mma, against Triton's 18 instructions for the word's dot product alone plus
the layout moves around it. Warps of a block split the supertiles (k) of the block's row tiles and add their
partial sums through shared memory. Predicted: ~2.5 instructions a weight; whether the step gets faster is what
the GPU run says (the loop may be bound by its loads' latency, not its instructions).
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

// y [N] = x [K] . W^T for tinygemm's int4 layout with 8 inner k tiles (w: uint4 [N / 8, S = K / 128, 32]),
// scales and zeros bf16 pairs [K / GROUP, N] (GROUP 32-128: whole groups in a 128-k supertile). A block: T row
// tiles of 8 rows (T even: two tiles an mma), its WARPS warps taking its supertiles in turn. Per group the tensor
// cores sum (128 + q) x in fp32 (exact products; the 128 bias cancels in fp32, not in bf16), and an mma of ones
// by x gives the group's sum of x, X: y += scale (D - 136 X) + zero X = scale D + (zero - 136 scale) X.
template <int GROUP, int T, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) int4_mma_gemv_kernel(
    const uint4* __restrict__ w, const uint32_t* __restrict__ x_pairs, const uint32_t* __restrict__ sz,
    __nv_bfloat16* __restrict__ y, int N, int S) {
    static_assert(T % 2 == 0, "two row tiles an mma");
    constexpr int WORDS_A_GROUP = GROUP / 32, GROUPS_A_SUPERTILE = 128 / GROUP;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, row = lane >> 2;  // row: A's (tile's) row g
    const int tiles = N / 8, tile0 = blockIdx.x * T;
    const uint32_t ones = 0x3F803F80u;
    float acc[T];  // row `row` of each tile (every lane of a group of 4 holds the same)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.f;
    // row `row` of each tile's (scale, zero) pairs, group 0; a tile past the end reads row 0's
    const uint32_t* sz_rows[T];
#pragma unroll
    for (int t = 0; t < T; ++t) sz_rows[t] = sz + ((tile0 + t) * 8 + row < N ? (tile0 + t) * 8 + row : 0);
    for (int s = warp; s < S; s += WARPS) {
        uint4 words[T];
#pragma unroll
        for (int t = 0; t < T; ++t) {  // a tile past the end reads the last one again; its sums are not stored
            const int tile = min(tile0 + t, tiles - 1);
            words[t] = __ldcs(w + ((size_t)tile * S + s) * 32 + lane);  // read once: evict first
        }
        uint32_t xb[8][2];  // B for the supertile's 8 k16 steps: x pairs k/2 = 64 s + 8 step + t, and + 4
        const uint32_t* x_step = x_pairs + s * 64 + (lane & 3);
#pragma unroll
        for (int step = 0; step < 8; ++step) {
            xb[step][0] = __ldg(x_step + step * 8);
            xb[step][1] = __ldg(x_step + step * 8 + 4);
        }
#pragma unroll
        for (int g = 0; g < GROUPS_A_SUPERTILE; ++g) {
            const size_t group = (size_t)s * GROUPS_A_SUPERTILE + g;
            float x_sum[4];  // every element: the group's sum of x
#pragma unroll
            for (int step = 2 * WORDS_A_GROUP * g; step < 2 * WORDS_A_GROUP * (g + 1); ++step)
                mma(x_sum, ones, ones, ones, ones, xb[step][0], xb[step][1], step == 2 * WORDS_A_GROUP * g);
#pragma unroll
            for (int t = 0; t < T; t += 2) {
                const uint32_t a[4] = {words[t].x, words[t].y, words[t].z, words[t].w};
                const uint32_t b[4] = {words[t + 1].x, words[t + 1].y, words[t + 1].z, words[t + 1].w};
                float d[4];  // d[0]: tile t's row `row`, d[2]: tile t + 1's
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
                acc[t] = fmaf(scale_a, d[0], fmaf(fmaf(-136.f, scale_a, bf16_high(sz_a)), x_sum[0], acc[t]));
                acc[t + 1] = fmaf(scale_b, d[2], fmaf(fmaf(-136.f, scale_b, bf16_high(sz_b)), x_sum[0], acc[t + 1]));
            }
        }
    }
    __shared__ float partial[WARPS][T * 8];
    if ((lane & 3) == 0) {
#pragma unroll
        for (int t = 0; t < T; ++t) partial[warp][t * 8 + row] = acc[t];
    }
    __syncthreads();
    for (int r = threadIdx.x; r < T * 8; r += WARPS * 32) {
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += partial[v][r];
        const int n = tile0 * 8 + r;
        if (n < N) y[n] = __float2bfloat16(sum);
    }
}
"""

CONFIGS = [(t, warps) for t in (2, 4, 8) for warps in (4, 8)]  # (row tiles a block, warps a block)
GROUPS = (64, 128)

LAUNCHER = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>

template <int GROUP, int T, int WARPS>
static void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, torch::Tensor& y,
                   cudaStream_t stream) {
    const int N = y.size(1), S = x.size(1) / 128, blocks = (N / 8 + T - 1) / T;
    int4_mma_gemv_kernel<GROUP, T, WARPS><<<blocks, WARPS * 32, 0, stream>>>(
        reinterpret_cast<const uint4*>(w.data_ptr()), reinterpret_cast<const uint32_t*>(x.data_ptr()),
        reinterpret_cast<const uint32_t*>(sz.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N, S);
}

// stream: torch.cuda.current_stream().cuda_stream
torch::Tensor int4_mma_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t t,
                            int64_t warps, int64_t stream_handle) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) % 128 == 0 && x.scalar_type() == torch::kBFloat16);
    TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && sz.is_contiguous());
    TORCH_CHECK(w.dim() == 4 && w.size(2) == 32 && w.size(3) == 4, "tinygemm's layout with 8 inner k tiles");
    const int64_t N = sz.size(1);
    TORCH_CHECK(N % 8 == 0 && w.size(0) == N / 8 && w.size(1) == x.size(1) / 128);
    auto y = torch::empty({1, N}, x.options());
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    DISPATCH
    TORCH_CHECK(false, "no build for this group / tiles / warps");
}
"""

DECLARATION = (
    "torch::Tensor int4_mma_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t t, "
    "int64_t warps, int64_t stream_handle);"
)


def launcher_source(groups=GROUPS, configs=CONFIGS) -> str:
    cases = "\n".join(
        f"    if (group == {g} && t == {t} && warps == {w}) {{ launch<{g}, {t}, {w}>(x, w, sz, y, stream); return y; }}"
        for g in groups
        for t, w in configs
    )
    return LAUNCHER.replace("    DISPATCH", cases)


def sass(cuobjdump: str) -> int:
    """Build every instance for sm_90 with nvcc and print, per instance, its SASS instruction counts."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    instances = "\n".join(
        f"template __global__ void int4_mma_gemv_kernel<{g}, {t}, {w}>(const uint4*, const uint32_t*, "
        f"const uint32_t*, __nv_bfloat16*, int, int);"
        for g in GROUPS
        for t, w in CONFIGS
    )
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        src.write_text(KERNEL + instances)
        subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-o", str(cubin), str(src)], check=True)
        listing = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run(
            [nvcc, "-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-o", str(cubin), str(src)],
            capture_output=True,
            text=True,
        ).stderr
    registers = {}
    name = None
    for line in usage.splitlines():
        if "Compiling entry function" in line:
            name = re.search(r"'([^']+)'", line).group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            registers[name] = int(m.group(1))
    print("| instance (GROUP, T, WARPS) | registers | SASS in all | in the supertile loop | HMMA | LOP3 | a weight |")
    print("|---|---|---|---|---|---|---|")
    for block in listing.split("Function : ")[1:]:
        fname = block.split()[0]
        code = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", block)
        at = {int(addr, 16): i for i, (addr, _, _) in enumerate(code)}
        opcodes = [op for _, op, _ in code]
        # the supertile loop: the backward branch that closes it, and its target
        loop = []
        for i, (addr, op, operands) in enumerate(code):
            target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
            if target and int(target.group(1), 16) < int(addr, 16):
                loop = opcodes[at[int(target.group(1), 16)] : i + 1]
                break
        g, t, w = re.search(r"ILi(\d+)ELi(\d+)ELi(\d+)E", fname).groups()
        weights = int(t) * 32  # a lane's weights a loop trip: T words x 4 x 8 nibbles
        hmma = sum(op.startswith("HMMA") for op in loop)
        lop3 = sum(op.startswith("LOP3") for op in loop)
        print(
            f"| {g}, {t}, {w} | {registers.get(fname, '?')} | {len(opcodes)} | {len(loop)} | {hmma} | {lop3} "
            f"| {len(loop) / weights:.2f} |"
        )
    return 0


def check_layout() -> int:
    """No GPU: replay the kernel's fragment mapping in Python (PTX's m16n8k16 A layout: register 0 row g k 2t..2t+1,
    1 row g + 8, 2 row g k 2t+8.., 3 row g + 8 k 2t+8..; g = lane / 4, t = lane % 4) over tinygemm's layout as
    gemv.int4_tinygemm_layout builds it, and check every (row, k) gets its own nibble exactly once."""
    import torch

    import gemv

    n, k = 32, 512
    torch.manual_seed(0)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    q = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(n, k).long()  # even k in the high nibble
    words = gemv.int4_tinygemm_layout(packed, 8).long() & 0xFFFFFFFF  # [n / 8, k / 128, 32, 4]
    seen = torch.full((n, k), -1, dtype=torch.long)
    for tile_a in range(0, n // 8, 2):  # the kernel's T loop: tiles t and t + 1 in one mma
        for s in range(k // 128):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for i in range(4):
                    for h in range(2):  # k16 steps 2 i and 2 i + 1: the word shifted by 8 h, then + 4
                        k0 = 128 * s + 32 * i + 16 * h
                        regs = [
                            (tile_a, 8 * h, 0),
                            (tile_a + 1, 8 * h, 0),
                            (tile_a, 8 * h + 4, 8),
                            (tile_a + 1, 8 * h + 4, 8),
                        ]
                        for tile, shift, k_off in regs:
                            v = words[tile, s, lane, i].item() >> shift
                            for e, nibble in enumerate((v & 15, (v >> 16) & 15)):
                                row, col = 8 * tile + g, k0 + 2 * t + k_off + e
                                assert seen[row, col] == -1, (row, col)
                                seen[row, col] = nibble
    ok = torch.equal(seen, q)
    print(f"fragment mapping over tinygemm's layout, {n} x {k}: {'every nibble in place' if ok else 'WRONG'}")
    return 0 if ok else 1


def gpu(quick: bool) -> int:
    import torch
    import triton
    from torch.utils.cpp_extension import load_inline
    from triton.testing import do_bench

    import gemv
    import quantize

    groups, configs = ((64,), [(4, 8), (2, 8), (8, 4)]) if quick else (GROUPS, CONFIGS)
    ext = load_inline(
        "int4_mma_probe_quick" if quick else "int4_mma_probe",
        cpp_sources=DECLARATION,
        cuda_sources=KERNEL + launcher_source(groups, configs),
        functions=["int4_mma_gemv"],
        extra_cuda_cflags=["-O3"],  # for the GPU it runs on (torch reads its compute capability)
    )
    torch.manual_seed(0)
    stream = torch.cuda.current_stream().cuda_stream
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    # Llama-3-8B's projections and how many a step (32 layers, the output once)
    shapes = {"wqkv": (6144, 4096, 32), "wo": (4096, 4096, 32), "w13": (28672, 4096, 32), "w2": (4096, 14336, 32)}
    if not quick:
        shapes["output"] = (128256, 4096, 1)
    step_ms = {}
    print("| shape | group | tinygemm GB/s | int4_gemv GB/s | ours, best GB/s (T, warps) | rel. error vs tinygemm |")
    print("|---|---|---|---|---|---|")
    for groupsize in groups:
        for name, (N, K, count) in shapes.items():
            linear = quantize.Int4Linear(K, N, groupsize=groupsize, device="cuda")
            linear.weight, linear.scales_and_zeros = quantize.quantize_int4(
                torch.randn(N, K, device="cuda") / 30, groupsize
            )
            linear.pack_()
            w, sz = linear.weight, linear.scales_and_zeros
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            nbytes = N * K // 2 + sz.numel() * 2
            ref = torch.ops.aten._weight_int4pack_mm(x, w, groupsize, sz).float()
            times = {
                "tinygemm": do_bench(lambda: torch.ops.aten._weight_int4pack_mm(x, w, groupsize, sz)),  # noqa: B023
                "int4_gemv": do_bench(lambda: gemv.int4_gemv(x, w, groupsize, sz)),  # noqa: B023
            }
            best, errors = None, []
            for t, warps in configs:
                got = ext.int4_mma_gemv(x, w, sz, groupsize, t, warps, stream).float()
                err = ((got - ref).norm() / ref.norm()).item()
                errors.append(err)
                if not err < 1e-2:
                    continue
                ms = do_bench(lambda: ext.int4_mma_gemv(x, w, sz, groupsize, t, warps, stream))  # noqa: B023
                if best is None or ms < best[0]:
                    best = (ms, t, warps)
            if best is not None:
                times["mma"] = best[0]
            for kernel, ms in times.items():
                step_ms[(groupsize, kernel)] = step_ms.get((groupsize, kernel), 0.0) + ms * count
            mma = f"{nbytes / best[0] / 1e6:.0f} ({best[1]}, {best[2]})" if best else "wrong"
            print(
                f"| {name} | {groupsize} | {nbytes / times['tinygemm'] / 1e6:.0f} | "
                f"{nbytes / times['int4_gemv'] / 1e6:.0f} | {mma} | {min(errors):.2e} - {max(errors):.2e} |",
                flush=True,
            )
    print("\nThe linears of one Llama-3-8B step, each alone (L2 flushed), summed, ms:")
    for (groupsize, kernel), ms in sorted(step_ms.items()):
        print(f"  g{groupsize} {kernel}: {ms:.3f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sass", action="store_true", help="no GPU: build for sm_90 and count the machine code")
    p.add_argument("--quick", action="store_true", help="GPU: group 64, three tiles, no output projection")
    p.add_argument("--check-layout", action="store_true", help="no GPU: the kernel's index math in Python")
    p.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump", help="cuobjdump (Triton ships one)")
    args = p.parse_args(argv)
    if args.check_layout:
        return check_layout()
    return sass(args.cuobjdump) if args.sass else gpu(args.quick)


if __name__ == "__main__":
    sys.exit(main())
