"""int4_mma.py's CUDA int4 GEMV (issue 10's int4 at 450 tok/s) beside tinygemm, and its tiles.

python scripts/int4_mma_probe.py --sass          # no GPU: nvcc's sm_90 machine code, instructions a weight
python scripts/int4_mma_probe.py --check-layout  # no GPU: the kernel's fragment index math, replayed in Python
python scripts/int4_mma_probe.py [--quick]       # a GPU (~2 min; nvcc builds every tile once): checks each
                                                 #   against tinygemm, then GB/s, each linear alone (L2 flushed)
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import int4_mma  # noqa: E402

# (row tiles a block, warps a block, prefetch the next supertile)
# (4 tiles at 32 warps spill: 64 registers a thread at 1024 threads a block)
CONFIGS = [(t, warps, p) for t, warps in ((2, 4), (2, 8), (2, 16), (2, 32), (4, 8), (4, 16)) for p in (False, True)]
GROUPS = (64, 128)


def sass(cuobjdump: str) -> int:
    """Build every instance for sm_90 with nvcc and print, per instance, its SASS instruction counts."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    instances = "\n".join(
        f"template __global__ void int4_mma_gemv_kernel<{g}, {t}, {w}, {str(p).lower()}, {n}, PLAIN>(const uint4*, "
        f"const uint32_t*, const uint32_t*, __nv_bfloat16*, int, int, int, Fold);"
        for g in GROUPS
        for t, w, p, n in [(*c, 1) for c in CONFIGS] + [(2, 8, False, 8), (2, 16, False, 8)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.cu", Path(tmp) / "k.cubin"
        src.write_text(int4_mma.KERNEL + instances)
        subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-o", str(cubin), str(src)], check=True)
        listing = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run(
            [nvcc, "-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-o", str(cubin), str(src)],
            capture_output=True,
            text=True,
        ).stderr
    registers, spills = {}, {}
    name = None
    for line in usage.splitlines():
        if "Compiling entry function" in line:
            name = re.search(r"'([^']+)'", line).group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            registers[name] = int(m.group(1))
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name:
            spills[name] = int(m.group(1))
    print(
        "| instance (GROUP, T, WARPS, PREFETCH, TOKENS) | registers | spilled bytes | SASS in all "
        "| in the supertile loop | HMMA | LOP3 | a weight |"
    )
    print("|---|---|---|---|---|---|---|---|")
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
        g, t, w, p, n = re.search(r"ILi(\d+)ELi(\d+)ELi(\d+)ELb(\d)ELi(\d+)E", fname).groups()
        weights = int(t) * 32  # a lane's weights a loop trip: T words x 4 x 8 nibbles
        hmma = sum(op.startswith("HMMA") for op in loop)
        lop3 = sum(op.startswith("LOP3") for op in loop)
        print(
            f"| {g}, {t}, {w}, {p}, {n} | {registers.get(fname, '?')} | {spills.get(fname, '?')} | {len(opcodes)} "
            f"| {len(loop)} | {hmma} | {lop3} | {len(loop) / weights:.2f} |"
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


def gpu(quick: bool, rows: int) -> int:
    import torch
    import triton
    from triton.testing import do_bench

    import quantize

    quick_configs = [(2, w, p) for w in (8, 16, 32) for p in (False, True)]
    groups, configs = ((64, 128), quick_configs) if quick else (GROUPS, CONFIGS)
    ext = int4_mma.load(
        f"int4_mma_probe_{'quick' if quick else 'grid'}_rows{1 if rows == 1 else 8}",
        groups=groups,
        configs=configs,
        tokens=(1 if rows == 1 else 8,),
        folds=(),
    )
    torch.manual_seed(0)
    stream = torch.cuda.current_stream().cuda_stream
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    # Llama-3-8B's projections and how many a step (32 layers, the output once)
    shapes = {"wqkv": (6144, 4096, 32), "wo": (4096, 4096, 32), "w13": (28672, 4096, 32), "w2": (4096, 14336, 32)}
    if not quick:
        shapes["output"] = (128256, 4096, 1)
    step_ms = {}
    print(
        "| shape | group | tinygemm GB/s | ours (config()) GB/s | ours, best GB/s (tiles, warps, "
        "prefetch) | rel. error vs tinygemm |"
    )
    print("|---|---|---|---|---|---|")
    for groupsize in groups:
        for name, (N, K, count) in shapes.items():
            linear = quantize.Int4Linear(K, N, groupsize=groupsize, device="cuda")
            linear.weight, linear.scales_and_zeros = quantize.quantize_int4(
                torch.randn(N, K, device="cuda") / 30, groupsize
            )
            linear.pack_()
            w, sz = linear.weight, linear.scales_and_zeros
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            nbytes = N * K // 2 + sz.numel() * 2
            ref = torch.ops.aten._weight_int4pack_mm(x, w, groupsize, sz).float()
            times = {"tinygemm": do_bench(lambda: torch.ops.aten._weight_int4pack_mm(x, w, groupsize, sz))}  # noqa: B023
            results, errors = {}, []
            for t, warps, prefetch in configs:
                got = ext.int4_mma_gemv(x, w, sz, groupsize, t, warps, int(prefetch), 0, stream).float()
                err = ((got - ref).norm() / ref.norm()).item()
                errors.append(err)
                if err < 1e-2:
                    results[(t, warps, prefetch)] = do_bench(
                        lambda: ext.int4_mma_gemv(x, w, sz, groupsize, t, warps, int(prefetch), 0, stream)  # noqa: B023
                    )
            cfg = int4_mma.config(N, K, rows)
            default = results.get((cfg["tiles"], cfg["warps"], cfg["prefetch"]), float("nan"))
            best = min(results, key=results.get) if results else None
            times["mma default"] = default
            times["mma best"] = results[best] if best else float("nan")
            for kernel, ms in times.items():
                step_ms[(groupsize, kernel)] = step_ms.get((groupsize, kernel), 0.0) + ms * count
            mma = f"{nbytes / default / 1e6:.0f} | {nbytes / results[best] / 1e6:.0f} {best}" if best else "wrong | -"
            print(
                f"| {name} | {groupsize} | {nbytes / times['tinygemm'] / 1e6:.0f} | {mma} | "
                f"{min(errors):.2e} - {max(errors):.2e} |",
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
    p.add_argument("--rows", type=int, default=1, help="GPU: rows of x (1-8; tinygemm beside at the same rows)")
    p.add_argument("--check-layout", action="store_true", help="no GPU: the kernel's index math in Python")
    p.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump", help="cuobjdump (Triton ships one)")
    args = p.parse_args(argv)
    if args.check_layout:
        return check_layout()
    return sass(args.cuobjdump) if args.sass else gpu(args.quick, args.rows)


if __name__ == "__main__":
    sys.exit(main())
