"""Compile every Triton kernel of the repo for a GPU architecture without a GPU, and print each
one's registers, spills and shared memory: a type error or a register blow-up shows up here, before
any device time is spent. Needs Triton next to torch (a CPU-only torch has none):

    python3 -m venv /tmp/tri && /tmp/tri/bin/pip install torch==2.13.0 triton==3.6.0   # 3.6: torch 2.11's
    /tmp/tri/bin/python scripts/compile_kernels.py            # sm_90 (H100/H200)
    /tmp/tri/bin/python scripts/compile_kernels.py --arch 80  # A100

`--loop` adds the size of each kernel's main loop (its longest backward branch) in SASS instructions and its
commonest opcodes: per element of work, that is what says a kernel is instruction-bound, and it showed the
split-KV kernel moving an int8 tile through shared memory a byte at a time (LDS.U8), and the fp8 cache's 192
conversion-pipe instructions a tile (kv_attention.KV_FP8_VIA_F32). `--sass-hash` adds a hash of each kernel's
machine code: a refactor meant to leave a kernel as it was (a helper pulled out, say) can be checked to
compile to the same code before any GPU sees it. Every line also gives the shared memory the launch asks for
(SMEM, with its pipeline stages) and the programs an SM holds (PER_SM): with the grid's size, how many waves
it runs in (fp16 KV tiles, since removed, ran 512 programs at 3 an SM, two waves, and gained nothing until
that was seen).

It compiles only: correctness is the GPU tests' job (and, for some kernels, Triton's CPU interpreter,
TRITON_INTERPRET=1, which cannot run inline asm or int8 -> bf16).
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gemv  # noqa: E402
import kv_attention  # noqa: E402

SASS_HASH = False  # --sass-hash: a refactor that should not change a kernel can be checked by its machine code
LOOP = False  # --loop: the main loop's instruction count and commonest opcodes


def main_loop(code: list[str]) -> str:
    """The longest loop of a kernel's SASS (instructions between a backward branch and its target):
    its length and its six commonest opcodes."""
    address = [int(line.split("*/", 1)[0].split("/*")[-1], 16) for line in code]
    body = []
    for i, line in enumerate(code):
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < address[i]:
            loop = [c for c, a in zip(code, address) if int(target.group(1), 16) <= a <= address[i]]
            body = max(body, loop, key=len)
    ops = Counter(re.sub(r"^(@!?U?P\w+\s+)", "", c.split("*/", 1)[1].strip()).split()[0] for c in body)
    return f"loop:{len(body)} " + ",".join(f"{op}x{n}" for op, n in ops.most_common(6))


def resources(cubin: bytes) -> str:
    """REG / STACK (spilled registers live there) / SHARED / LOCAL as cuobjdump reports them (and a hash
    of the SASS, or its main loop, if asked)."""
    path = "/tmp/compile_kernels.cubin"
    Path(path).write_bytes(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    found = " ".join(re.findall(r"REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+", report))  # STACK: spills
    if SASS_HASH or LOOP:
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
        lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
        if LOOP:
            found += " " + main_loop(lines)
    if SASS_HASH:
        code = "\n".join(line.split("*/", 1)[-1] for line in sass.splitlines() if "/*" in line and "*/" in line)
        found += " SASS:" + hashlib.sha256(code.encode()).hexdigest()[:12]
    return found


def programs_per_sm(registers: int, shared: int, num_warps: int, arch: int) -> int:
    """How many programs of a kernel an SM holds at once, by its registers (65536 an SM, allocated per
    warp in 256s), its shared memory (228 KB an SM on sm_90, 164 on sm_80; 1 KB reserved a program) and
    its warps (64 an SM). With the grid's size this says how many waves it runs in: a grid just over a
    wave takes two program lifetimes (fp16 KV tiles at 3 stages: 69.6 KB, 3 an SM, 512 programs)."""
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = 65536 // warp_registers // num_warps
    by_shared = (228 if arch >= 90 else 164) * 1024 // (shared + 1024)
    return min(by_registers, by_shared, 64 // num_warps, 32)


def build(target, name, fn, signature, constexprs, divisible, **options):
    """divisible: indices of the arguments Triton may assume are multiples of 16 (as it does at
    run time for such values); without them every load comes out byte-wide. Prints the resources,
    the shared memory the launch asks for (SMEM, with the pipeline's stages) and programs an SM (PER_SM)."""
    src = ASTSource(
        fn=fn,
        signature={**signature, **{k: "constexpr" for k in constexprs}},
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in divisible},
    )
    kernel = triton.compile(src, target=target, options=options)
    found = resources(kernel.asm["cubin"])
    registers = int(re.search(r"REG:(\d+)", found).group(1))
    shared = kernel.metadata.shared
    per_sm = programs_per_sm(registers, shared, options.get("num_warps", 4), target.arch)
    print(f"{name:60s} {found} SMEM:{shared} PER_SM:{per_sm}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90)")
    p.add_argument("--sass-hash", action="store_true", help="also print a hash of each kernel's machine code")
    p.add_argument("--loop", action="store_true", help="also print each kernel's main loop: SASS length, opcodes")
    args = p.parse_args(argv)
    global SASS_HASH, LOOP
    SASS_HASH, LOOP = args.sass_hash, args.loop
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{target.arch}")
    decode_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "scale_ptr": "*fp32", "norm_ptr": "*bf16", "res_ptr": "*bf16"}
    decode_sig.update({"y_ptr": "*bf16", "ids_ptr": "*i64", "N": "i32", "K": "i32", "rows_per_x": "i32"})
    decode_sig.update({"cos_ptr": "*bf16", "sin_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i64"})
    decode_sig.update({"S": "i32"})
    no_rope = {"ROPE": 0, "HQ": 0, "HKV": 0, "HEAD_DIM": 2}
    for n, k, norm, glu, residual, int8, experts, pdl in (
        (960, 576, 1, 0, 0, 0, 0, 0),
        (28672, 4096, 1, 1, 0, 0, 0, 0),  # Llama-3-8B's w13, SiLU(gate) * up stored
        (4096, 14336, 0, 0, 1, 0, 0, 0),
        (128256, 4096, 0, 0, 0, 0, 0, 0),
        (6144, 4096, 1, 0, 0, 1, 0, 0),
        (28672, 4096, 1, 1, 0, 1, 0, 0),
        (4096, 4096, 0, 0, 0, 1, 0, 0),  # Int8Linear's one row (wo, unfused), and int8 experts (Mixtral's w2)
        (4096, 14336, 0, 0, 0, 1, 1, 0),
        (1536, 2048, 1, 1, 0, 0, 1, 0),  # Qwen3-30B-A3B's experts: gate/up, then down
        (2048, 768, 0, 0, 0, 0, 1, 0),
        # launched with programmatic dependent launch (kv_attention.PDL): the weight's first tile to L2, then the wait
        (960, 576, 1, 0, 0, 0, 0, 1),
        (3072, 576, 1, 1, 0, 0, 0, 1),  # SmolLM2's w13
        (576, 1536, 0, 0, 1, 0, 0, 1),
        (6144, 4096, 1, 0, 0, 1, 0, 1),
        (1536, 2048, 1, 1, 0, 0, 1, 1),
    ):
        cfg = gemv.decode_gemv_tiles(n, k, int8, glu)
        for convert in (0, 1, 2) if int8 and not glu and not pdl else (cfg["CONVERT"],):  # each int8 -> fp32 form
            consts = {"EPS": 1e-5, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "CONVERT": convert}
            consts.update(gemv.decode_gemv_whole_tiles(n // 2 if glu else n, k, cfg))
            build(
                target,
                f"decode gemv {n}x{k} norm={norm} glu={glu} res={residual} int8={int8} experts={experts}"
                + (f" convert={convert}" if int8 else "")
                + (" pdl" if pdl else ""),
                gemv._decode_gemv_kernel,
                {**decode_sig, "w_ptr": "*i8" if int8 else "*bf16"},
                {**consts, "NORM": norm, "GLU": glu, "RESIDUAL": residual, "EXPERTS": experts, "PDL": pdl, **no_rope},
                range(9),
                num_warps=cfg["num_warps"],
                num_stages=cfg.get("num_stages", 3),
                launch_pdl=bool(pdl),
            )
    # wqkv with RoPE and the cache write in its epilogue (gemv.decode_gemv_rope_kv): SmolLM2, Llama-3-8B int8
    for n, k, hq, hkv, d, int8, pdl in (
        (960, 576, 9, 3, 64, 0, 0),
        (960, 576, 9, 3, 64, 0, 1),
        (6144, 4096, 32, 8, 128, 1, 1),
    ):
        cfg = gemv.decode_gemv_tiles(n, k, int8, True)
        rope = {"ROPE": 1, "HQ": hq, "HKV": hkv, "HEAD_DIM": d}
        build(
            target,
            f"wqkv + rope + cache write {n}x{k} norm=1 int8={int8}" + (" pdl" if pdl else ""),
            gemv._decode_gemv_kernel,
            {**decode_sig, "w_ptr": "*i8" if int8 else "*bf16"},
            {"EPS": 1e-5, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "CONVERT": cfg["CONVERT"], "NORM": 1,
             "GLU": 0, "RESIDUAL": 0, "EXPERTS": 0, "PDL": pdl, **rope, **gemv.decode_gemv_whole_tiles(n // 2, k, cfg)},
            range(9),
            num_warps=cfg["num_warps"],
            num_stages=cfg.get("num_stages", 3),
            launch_pdl=bool(pdl),
        )  # fmt: skip
    rope_sig = {n: "*bf16" for n in ("qkv_ptr", "cos_ptr", "sin_ptr", "q_ptr", "k_ptr", "v_ptr")}
    rope_sig.update({"slot_ptr": "*i64", "q_norm_ptr": "*bf16", "k_norm_ptr": "*bf16", "S": "i32"})
    for hq, hkv, d, qk_norm, pdl in ((9, 3, 64, 0, 0), (32, 4, 128, 1, 0), (9, 3, 64, 0, 1)):  # SmolLM2, Qwen3
        build(
            target,
            f"rope + cache write Hq={hq} Hkv={hkv} D={d} qk_norm={qk_norm}" + (" pdl" if pdl else ""),
            kv_attention._rope_write_kv_kernel,
            rope_sig,
            {"HQ": hq, "HKV": hkv, "D": d, "D_PAD": d, "EPS": 1e-6, "QK_NORM": qk_norm, "PDL": pdl},
            range(9),
            num_warps=1,
            launch_pdl=bool(pdl),
        )
    dot_sig = {
        "x_ptr": "*bf16",
        "w_ptr": "*i8",
        "part_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "k_per_split": "i32",
    }
    for x in ("*bf16", "*fp32"):
        consts = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "CONVERT": gemv.INT8_CONVERT}
        build(
            target,
            f"int8 dot x={x[1:]}",
            gemv._int8_gemm_dot_kernel,
            {**dot_sig, "x_ptr": x},
            consts,
            (0, 1, 2, 5, 6),
            num_warps=4,
            num_stages=3,
        )
    for d, inter in ((2048, 768), (4096, 14336)):  # Qwen3-30B-A3B, Mixtral-8x7B
        cfg = gemv.expert_gate_up_config(8)
        build(
            target,
            f"expert gate/up D={d} I={inter}",
            gemv._expert_gate_up_kernel,
            {"x_ptr": "*bf16", "order_ptr": "*i64", "ends_ptr": "*i32", "w_ptr": "*bf16", "h_ptr": "*bf16",
             "D": "i32", "inter": "i32", "rows_per_x": "i32"},
            {"BLOCK_M": 16, "BLOCK_I": cfg["BLOCK_I"], "BLOCK_D": cfg["BLOCK_D"]},
            (0, 1, 2, 3, 4, 5, 6),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )  # fmt: skip
    for n, k in ((28672, 4096), (4096, 14336), (1536, 2048)):  # Mixtral w13 / w2, Qwen3-30B-A3B w13
        cfg = gemv.int8_gemm_dot_config(n, k)
        build(
            target,
            f"int8 grouped experts {n}x{k}",
            gemv._int8_expert_dot_kernel,
            {"x_ptr": "*bf16", "order_ptr": "*i64", "ends_ptr": "*i32", "w_ptr": "*i8", "scale_ptr": "*bf16",
             "part_ptr": "*fp32", "R": "i32", "N": "i32", "K": "i32", "rows_per_x": "i32", "k_per_split": "i32"},
            {"BLOCK_M": 16, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "CONVERT": gemv.INT8_CONVERT},
            (0, 1, 2, 3, 4, 5, 7, 8, 10),  # pointers, N, K, k_per_split: multiples of 16 at run time
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )  # fmt: skip
    kv_sig = {
        "q_ptr": "*bf16", "k_ptr": "*i8", "k_scale_ptr": "*bf16", "v_ptr": "*i8", "v_scale_ptr": "*bf16",
        "row_start_ptr": "*i32", "q_slot_ptr": "*i64", "acc_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32",
        "y_ptr": "*bf16", "n_kv_heads": "i32", "S": "i32", "window": "i32",
    }  # fmt: skip
    kv_divisible = (*range(11), 12)  # pointers and S: multiples of 16 at run time
    for store in ("*i8", "*fp8e4nv", None):  # None: an unquantized cache (decode_attention), no scales
        for dtype in ("*bf16", "*fp16", "*fp32"):
            for group, head_dim in ((4, 128), (1, 80)):
                sig = {
                    **kv_sig,
                    "q_ptr": dtype,
                    "k_scale_ptr": dtype,
                    "v_scale_ptr": dtype,
                    "k_ptr": store or dtype,
                    "v_ptr": store or dtype,
                    "y_ptr": dtype,
                }
                modes = [(False, False)]  # (fp8 via fp32, launched with PDL)
                if store is None and dtype == "*bf16":  # kv_attention.PDL
                    modes += [(False, True)]
                if store == "*fp8e4nv" and dtype == "*bf16":  # KV_FP8_VIA_F32 (the default there) and Triton's
                    modes = [(True, False), (False, False)]
                for fp8_via_f32, pdl in modes:
                    consts = dict(
                        D=head_dim,
                        G=group,
                        G_PAD=16,
                        D_PAD=triton.next_power_of_2(head_dim),
                        BLOCK=kv_attention.BLOCK_N,
                        SPLITS=8,
                        SPLITS_PAD=8,
                        HAS_SCALES=store is not None,
                        FP8_VIA_F32=fp8_via_f32,
                        PDL=pdl,
                        WHOLE_TILES=kv_attention.WHOLE_TILES,
                    )
                    name = f"kv decode {(store or dtype)[1:]} cache, {dtype[1:]}, G={group}, D={head_dim}"
                    build(
                        target,
                        name + (", via fp32" if fp8_via_f32 else "") + (", pdl" if pdl else ""),
                        kv_attention._quantized_decode_kernel,
                        sig,
                        consts,
                        kv_divisible,
                        num_warps=kv_attention.NUM_WARPS,  # the launch's stages: the shared memory it asks for
                        num_stages=kv_attention.NUM_STAGES,
                        launch_pdl=pdl,
                    )
    # one split (a big batch, a cache of up to SINGLE_SPLIT_MAX_TILES tiles): it writes the output, no merge. The last
    # is SmolLM2-135M's batch-1 step (issue 11): 3 programs, one a kv head, launched with PDL
    for store, group, head_dim, pdl in (("*i8", 4, 128, False), ("*bf16", 4, 128, False), ("*bf16", 3, 64, True)):
        build(
            target,
            f"kv decode {store[1:]} cache, bf16, G={group}, D={head_dim}, one split" + (", pdl" if pdl else ""),
            kv_attention._quantized_decode_kernel,
            {**kv_sig, "k_ptr": store, "v_ptr": store},
            dict(D=head_dim, G=group, G_PAD=16, D_PAD=head_dim, BLOCK=kv_attention.BLOCK_N, SPLITS=1, SPLITS_PAD=1,
                 HAS_SCALES=store == "*i8", FP8_VIA_F32=False, PDL=pdl,
                 WHOLE_TILES=kv_attention.WHOLE_TILES),
            kv_divisible,
            num_warps=kv_attention.NUM_WARPS,
            num_stages=kv_attention.NUM_STAGES,
            launch_pdl=pdl,
        )  # fmt: skip
    # Qwen3-30B-A3B's experts' down projection + mix
    for tokens, residual, pdl in ((1, 1, 1), (1, 0, 0), (8, 0, 0)):
        cfg = gemv.expert_down_config(tokens)
        build(
            target,
            f"expert down + mix, {tokens} token(s)" + (" + residual" if residual else "") + (" pdl" if pdl else ""),
            gemv._expert_down_mix_kernel,
            {"h_ptr": "*bf16", "ids_ptr": "*i64", "mix_ptr": "*fp32", "w_ptr": "*bf16", "y_ptr": "*bf16",
             "res_ptr": "*bf16", "D": "i32", "inter": "i32"},
            {"K_ACTIVE": 8, "BLOCK_D": cfg["BLOCK_D"], "BLOCK_I": cfg["BLOCK_I"], "RESIDUAL": residual, "PDL": pdl},
            range(8),
            num_warps=cfg.get("num_warps", 4),
            launch_pdl=bool(pdl),
        )  # fmt: skip
    for experts, k, pdl in ((128, 8, 1), (8, 2, 0)):  # Qwen3-30B-A3B, Mixtral: the router's pick
        build(
            target,
            f"route, top {k} of {experts}" + (" pdl" if pdl else ""),
            gemv._route_kernel,
            {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i64", "E": "i32"},
            {"K_ACTIVE": k, "K_PAD": k, "E_PAD": experts, "PDL": pdl},
            range(3),
            num_warps=1,
            launch_pdl=bool(pdl),
        )
    merge_sig = {"acc_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "y_ptr": "*bf16"}
    for splits, pdl in ((2, 0), (10, 0), (64, 0), (10, 1)):
        consts = dict(D=128, G=4, G_PAD=16, D_PAD=128, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits))
        build(
            target,
            f"kv merge of {splits} splits" + (" pdl" if pdl else ""),
            kv_attention._merge_splits_kernel,
            merge_sig,
            {**consts, "PDL": pdl},
            range(4),
            num_warps=4,
            launch_pdl=bool(pdl),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
