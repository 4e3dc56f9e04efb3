"""Weight-only int8 / int4 quantization of a checkpoint, and the int8 / fp8 KV cache.

    python quantize.py --checkpoint checkpoints/SmolLM2-135M-Instruct --mode int8
    python quantize.py --checkpoint checkpoints/SmolLM2-135M-Instruct --mode int4 --groupsize 64

The new checkpoint's config.json records {"mode": "int8"} or {"mode": "int4", "groupsize": G};
generate.py reads the mode from there, never from a directory name. Quantized: every Linear of the
layers (wqkv, wo, w13, w2) and an untied output projection; biases stay float. A tied embedding
stays in the compute dtype (it is also the lookup table), so the output projection of a tied
model (SmolLM2, Llama-3.2, small Qwens) is not quantized.

- int8: symmetric, one scale per output channel (absmax / 127).
- int4: asymmetric, one scale and zero per `groupsize` input features, run by tinygemm
  (aten._weight_int4pack_mm on CUDA sm_80+, _weight_int4pack_mm_for_cpu on the CPU). A group size
  that does not divide in_features pads the input dimension (see GROUPSIZES).
- QuantizedKVCache: the int8 / fp8 (e4m3) KV cache of `generate.py --kv-cache-dtype int8|fp8`.

Accuracy on the real SmolLM2-135M-Instruct and Botchan: scripts/eval_quant.py.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import gemv
import int4_mma
import kv_attention
from checkpoint import (
    CHECKPOINT_CONFIG,
    CHECKPOINT_WEIGHTS,
    CPU_KERNEL_ALIGNMENT,
    CheckpointError,
    OutputExistsError,
    check_output_dir,
    read_checkpoint_config,
    save_checkpoint,
)
from errors import FastgenError, first_line
from model import Experts, FeedForward, KVCache, RMSNorm, Transformer, TransformerBlock, write_slots

QUANTIZED_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


class QuantizationError(FastgenError):
    """A one-line, user-facing reason a quantization cannot be done."""


# ----------------------------------------------------------------------------- int8


def quantize_int8(weight: torch.Tensor):
    """Symmetric per-output-channel int8: weight ~= int8 * scale[row]."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


# Up to this many activation rows (batch x tokens) the CPU runs the int8 linear through torch's
# int8 weight-only kernel (a GPU's limits are gemv.py's).
CPU_INT8_KERNEL_MAX_ROWS = 4


def cpu_int8_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._weight_int8pack_mm on the CPU, where we have seen it right (torch 2.13): bf16
    activations, both weight dims multiples of 16, contiguous input, 64-byte aligned weight and
    input (other shapes gave wrong values, unaligned ones crashed; load_model aligns weights),
    eager only (the compiled path keeps the plain form below)."""
    out_features, in_features = weight.shape
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and out_features % 16 == 0
        and in_features % 16 == 0
        and not torch.compiler.is_compiling()
        and x.is_contiguous()
        and weight.data_ptr() % CPU_KERNEL_ALIGNMENT == 0
        and x.data_ptr() % CPU_KERNEL_ALIGNMENT == 0
    )


class Int8Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows == 1 and gemv.available(x):
            # batch-1 decode on a GPU: one Triton pass over the int8 weight (gemv.py)
            y = gemv.decode_gemv(x.reshape(rows, -1), self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        elif rows <= gemv.INT8_DOT_MAX_ROWS and gemv.available(x):
            # batched decode on a GPU: tensor cores, still one pass over the int8 weight (gemv.py)
            y = gemv.int8_gemm_few_rows(x.reshape(rows, -1).contiguous(), self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        elif rows <= CPU_INT8_KERNEL_MAX_ROWS and cpu_int8_kernel_fits(x, self.weight):
            # eager bf16 decode on the CPU: torch's int8 weight-only kernel reads each int8 byte
            # once instead of converting the whole weight first (SmolLM2: 1.66x tok/s, BENCHMARKS.md)
            y = torch._weight_int8pack_mm(x.reshape(rows, -1), self.weight, self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            # fp32 scales: a bf16 multiply here would match Inductor's woq_int8 rewrite, whose
            # CUDA lowering crashes on torch 2.11
            y = (F.linear(x, self.weight.to(x.dtype)) * self.scales.float()).to(x.dtype)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------- int4

# tinygemm's group sizes. A group size that does not divide in_features is honoured by padding
# the input dimension with zero activations up to a whole number of groups (SmolLM2's 576 at
# group 128 -> 640, at 256 -> 768): the padded columns cost memory and reads, never accuracy.
GROUPSIZES = (32, 64, 128, 256)


def int4_padded_in_features(in_features: int, groupsize: int) -> int:
    # groupsize >= 32, so this is also a multiple of tinygemm's 16 * inner_k_tiles for some tiles >= 2
    return -(-in_features // groupsize) * groupsize


def check_int4_shape(out_features: int, groupsize: int, what: str = "a Linear"):
    if groupsize not in GROUPSIZES:
        raise QuantizationError(f"int4 groupsize must be one of {GROUPSIZES} (got {groupsize})")
    if out_features % 8:  # tinygemm tiles n by 8
        raise QuantizationError(f"int4 needs out_features divisible by 8; {what} has {out_features}")


def quantize_int4(weight: torch.Tensor, groupsize: int):
    """Asymmetric int4 per group of `groupsize` input features, in tinygemm's convention:
    weight ~= (q - 8) * scale + zero with q in [0, 15] and zero = min + 8 * scale.

    Returns q packed two per byte (uint8 [n, k_pad/2], even column in the high nibble: the
    portable file format, which is also what _convert_weight_to_int4pack takes since torch 2.5)
    and scales_and_zeros bf16 [k_pad/groupsize, n, 2] (the kernels' operand). k_pad is
    in_features rounded up to a whole number of groups; padded columns repeat the row's last
    weight (so they never widen a group's range) and meet zero activations.
    """
    n, k = weight.shape
    check_int4_shape(n, groupsize)
    k_pad = int4_padded_in_features(k, groupsize)
    w = weight.float()
    if k_pad != k:
        w = torch.cat([w, w[:, -1:].expand(n, k_pad - k)], dim=1)
    w = w.view(n, k_pad // groupsize, groupsize)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    # The kernels read scale and zero as bf16. The zero anchors the middle of the group's range
    # (q = 8), so a rounded scale errs by at most 8 steps' worth either way; q is then the nearest
    # point of the grid the kernel actually dequantizes to.
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = (lo + 8 * scales).to(torch.bfloat16)
    scales = scales.to(torch.bfloat16)
    mins = zeros.float() - 8 * scales.float()
    q = torch.round((w - mins[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8).view(n, k_pad)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return (q[:, ::2] << 4) | q[:, 1::2], scales_and_zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] -> int32 [n, k] values in [0, 15]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1).to(torch.int32)


def dequantize_int4(packed, scales_and_zeros, groupsize):
    """The float weight [n, k_pad] the int4 kernels multiply by (reference for tests)."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [n, k/g, 2]
    w = (q.view(n, k // groupsize, groupsize) - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(n, k)


def int4_inner_k_tiles(k: int) -> int:
    # tinygemm tiles k by 16 * inner_k_tiles; take the widest tiling that divides k
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise QuantizationError(f"int4 needs in_features divisible by 32 (got {k})")


# The tinygemm packing op of each device type (its matmul op is named alike).
INT4_PACK_OPS = {"cuda": "_convert_weight_to_int4pack", "cpu": "_convert_weight_to_int4pack_for_cpu"}


def check_int4_supported(device):
    """One-line QuantizationError where the int4 kernels are missing (device type, torch build, GPU arch)."""
    device = torch.device(device)
    op = INT4_PACK_OPS.get(device.type)
    if op is None or not hasattr(torch.ops.aten, op):
        raise QuantizationError(
            f"int4 has no kernel on {device.type} with torch {torch.__version__}; use an int8 checkpoint there"
        )
    if device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # tinygemm is built for sm_80 and newer only
            raise QuantizationError(
                f"int4 (tinygemm) needs an sm_80+ GPU; this one is sm_{major}{minor}; use an int8 checkpoint there"
            )


class Int4Linear(nn.Module):
    """Group-wise int4 weight through the tinygemm kernels (aten._weight_int4pack_mm on CUDA,
    its _for_cpu twin on the CPU).

    The file holds the portable nibble-packed weight (uint8 [out, in_pad/2]) and bf16
    scales_and_zeros [in_pad/groupsize, out, 2]. Loading (`load_state_dict`, with or without
    assign=True) repacks the weight into the kernel's tile layout for the device it was loaded
    on, in _load_from_state_dict: before any compile or CUDA-graph capture, with no work left for
    the first forward. Code that fills the buffers another way (to_empty + random fill) calls
    pack_() itself. After packing, state_dict() holds the device layout: do not save it.
    """

    def __init__(self, in_features, out_features, bias=False, groupsize=64, device=None):
        super().__init__()
        check_int4_shape(out_features, groupsize)
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in_features = int4_padded_in_features(in_features, groupsize)
        self.inner_k_tiles = int4_inner_k_tiles(self.padded_in_features)
        k = self.padded_in_features
        self.register_buffer("weight", torch.empty(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_and_zeros", torch.empty(k // groupsize, out_features, 2, dtype=torch.bfloat16, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.is_packed = False  # True once `weight` holds the device's tile layout

    def pack_(self):
        """Replace the portable weight with the kernel's layout for its device (once), and make
        scales_and_zeros the bf16 the kernels take (the loader casts floats to the compute dtype)."""
        if self.is_packed:
            return
        device = self.weight.device
        check_int4_supported(device)
        if device.type == "cuda":
            # since torch 2.5 the CUDA op takes the nibble-packed uint8 [n, k/2] directly
            self.weight = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), self.inner_k_tiles)
            int4_mma.build()  # at load, not inside a first forward that a compile or a graph capture runs
        else:
            # the CPU op takes one int32 value in [0, 15] per weight, [n, k]
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_int4(self.weight), self.inner_k_tiles
            )
        self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16).contiguous()
        self.is_packed = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.is_packed = False  # a load brings the portable layout back
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.weight.device.type != "meta":
            self.pack_()

    def forward(self, x):
        shape = x.shape
        # Both kernels take bf16 activations (on the CPU an fp32 input takes a path ~40x slower,
        # measured: 1834 ms vs 50 ms for a 1024 x 576 x 3072 product on 2 cores).
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.padded_in_features != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in_features - self.in_features))
        # a no-op once packed; guards against a later model.to(dtype) (the CUDA kernel reads bf16 blindly)
        sz = self.scales_and_zeros.to(torch.bfloat16)
        if int4_mma.applies(x2, self.weight, self.groupsize):
            # decode (1-8 rows): the CUDA tensor-core kernel over the same packed weight (where nvcc built it)
            y = int4_mma.int4_mma_gemv(x2, self.weight, self.groupsize, sz)
        else:  # tinygemm, CUDA or CPU (each device's own packed layout)
            y = int4_mma.int4_product(x2.contiguous(), self.weight, self.groupsize, sz)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4DecodeBlock(TransformerBlock):
    """A dense block of Int4Linears whose batch-1 decode step (one bf16 token on a GPU) runs as four int4_mma kernels
    (FASTGEN_INT4_FOLD=0 turns them off) and the attention: attention_norm, RoPE and the cache write folded into
    wqkv's, the residual add into wo's, ffn_norm and SiLU(gate) * up into w13's, the residual add into w2's. Every
    other call is TransformerBlock's. use_int4_decode_blocks picks the blocks and gives each the model's RoPE inputs
    (inv_freq, row_start: the wqkv kernel makes the token's angles from them, not from cos / sin; see
    int4_mma_norm_rope_kv)."""

    rope_inv_freq: torch.Tensor  # the model's inv_freq [D / 2]
    rope_row_start: torch.Tensor  # the model's row_start [B], made by setup_caches

    def forward(self, x, cos, sin, attend, input_pos):
        attention, ffn = self.attention, self.feed_forward
        wqkv, wo, w13, w2 = attention.wqkv, attention.wo, ffn.w13, ffn.w2
        x1 = x.reshape(-1, x.shape[-1])  # [1, D] at a batch-1 decode step
        if not (input_pos.dim() == 1 and int4_mma.fold_applies(x1, wqkv.weight, wqkv.groupsize)):
            return super().forward(x, cos, sin, attend, input_pos)
        norm, cache = self.attention_norm, attention.kv_cache
        q = int4_mma.int4_mma_norm_rope_kv(
            x1,
            wqkv.weight,
            wqkv.groupsize,
            wqkv.scales_and_zeros,
            norm.weight,
            norm.eps,
            self.rope_inv_freq,
            self.rope_row_start,
            cache.k_cache,
            cache.v_cache,
            input_pos.reshape(1),  # the token's slot
            attention.n_heads,
        )  # [1, Hq, 1, D]
        heads = attend(q, cache).to(x.dtype).reshape(1, -1)  # [1, Hq D]
        h = int4_mma.int4_mma_residual(heads, wo.weight, wo.groupsize, wo.scales_and_zeros, x1)  # [1, D]
        norm = self.ffn_norm
        hidden = int4_mma.int4_mma_norm_glu(h, w13.weight, w13.groupsize, w13.scales_and_zeros, norm.weight, norm.eps)
        return int4_mma.int4_mma_residual(hidden, w2.weight, w2.groupsize, w2.scales_and_zeros, h).view_as(x)


def int4_decode_block_fits(block: nn.Module) -> bool:
    """A dense TransformerBlock of packed CUDA Int4Linears that Int4DecodeBlock runs as it stands: bf16 RMSNorms
    and an unquantized bf16 cache (int4_mma's folds read both as bf16), no query/key norms or biases, no padded
    inputs (the norm's width is the kernel's K), no hooks (tensor parallel's all-reduces would be skipped)."""
    if type(block) is not TransformerBlock or type(block.feed_forward) is not FeedForward:
        return False
    a, f = block.attention, block.feed_forward
    linears = (a.wqkv, a.wo, f.w13, f.w2)
    norms = (block.attention_norm, block.ffn_norm)
    return (
        all(
            type(m) is Int4Linear
            and m.is_packed
            and m.weight.is_cuda
            and m.bias is None
            and m.groupsize in int4_mma.GROUPS
            and m.padded_in_features == m.in_features
            and m.inner_k_tiles == 8  # int4_mma reads tinygemm's layout with 8 inner k tiles
            and not m._forward_hooks
            and not m._forward_pre_hooks
            for m in linears
        )
        and all(type(n) is RMSNorm and n.weight.dtype == torch.bfloat16 for n in norms)
        and a.wqkv.in_features <= int4_mma.MAX_NORM_K  # the norm folds hold x in shared memory
        and a.q_norm is None
        and type(a.kv_cache) in (KVCache, kv_attention.SplitKVCache)
        and a.kv_cache.k_cache.dtype == torch.bfloat16
        and a.kv_cache.k_cache.shape[0] == 1
        and not f._forward_hooks
        and not a._forward_hooks
    )


def use_int4_decode_blocks(model: nn.Module) -> None:
    """Unless FASTGEN_INT4_FOLD=0, with int4_mma built (by an int4 model packed for a GPU), make the model's fitting
    int4 blocks Int4DecodeBlocks (in place: no parameter is copied) holding the model's inv_freq and row_start, and
    blocks that no longer fit (a new cache: quantized, another batch) TransformerBlocks again. Call it after every
    setup_caches (which makes a new row_start): gemv.use_decode_kernels does, which Generator.setup calls."""
    if not (int4_mma.FOLD_ENABLED and int4_mma.built() and isinstance(model, Transformer)):
        return  # (the blocks take the Transformer's inv_freq and row_start)
    for module in model.modules():
        if type(module) is Int4DecodeBlock:
            module.__class__ = TransformerBlock
        if int4_decode_block_fits(module):
            module.__class__ = Int4DecodeBlock
            module.rope_inv_freq, module.rope_row_start = model.inv_freq, model.row_start


# ----------------------------------------------------------------------------- model surgery


def quantizable_linears(model):
    """(qualified name, module) of every Linear quantization replaces."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.endswith(QUANTIZED_LINEARS) or name == "output"):
            yield name, module


def apply_quantization(model, quantization: dict, device=None):
    """Swap Linear modules for Int8Linear / Int4Linear (shapes only: works on the meta device).
    `device`: where the weights will live, to refuse int4 where its kernel is missing."""
    mode = quantization.get("mode")
    if mode not in ("int8", "int4"):
        raise QuantizationError(f"unknown quantization mode {mode!r} in the checkpoint config")
    if mode == "int4" and device is not None:
        check_int4_supported(device)
    quantize_experts_modules(model, quantization)  # a mixture's experts (end of this file)
    for name, linear in list(quantizable_linears(model)):
        device = linear.weight.device
        bias = linear.bias is not None
        if mode == "int8":
            new = Int8Linear(linear.in_features, linear.out_features, bias, device)
        else:
            new = Int4Linear(linear.in_features, linear.out_features, bias, quantization["groupsize"], device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def quantize_checkpoint(checkpoint_dir, mode: str, groupsize: int | None = None, output_dir=None, force=False):
    """Quantize a checkpoint tensor by tensor into a new directory (written atomically)."""
    from safetensors import safe_open

    checkpoint_dir = Path(checkpoint_dir)
    config = read_checkpoint_config(checkpoint_dir)
    if config.get("quantization"):
        raise QuantizationError(
            f"{checkpoint_dir} is already quantized ({config['quantization']}); "
            f"quantize the unquantized checkpoint instead"
        )
    if mode == "int4":
        groupsize = groupsize or 64
        if groupsize not in GROUPSIZES:
            raise QuantizationError(f"int4 groupsize must be one of {GROUPSIZES} (got {groupsize})")
    elif mode != "int8":
        raise QuantizationError(f"mode must be int8 or int4 (got {mode!r})")
    base = checkpoint_dir if checkpoint_dir.name not in ("", "..") else checkpoint_dir.resolve()  # "." has no name
    default_output = Path(f"{base}-int8" if mode == "int8" else f"{base}-int4-g{groupsize}")
    output_dir = Path(output_dir or default_output)
    check_output_dir(checkpoint_dir, output_dir, force, what="the source checkpoint")

    weight_names = {f"{name}.weight" for name in _linear_names(config)}
    tensors = {}  # the quantized model (smaller than the source); the source stays memory-mapped
    path = checkpoint_dir / CHECKPOINT_WEIGHTS
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__})") from None
    with f:
        names = list(f.keys())
        missing = sorted(weight_names - set(names))
        if missing:
            raise CheckpointError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all)")
        # One bar on a terminal (none in logs); cleared when done or on an error.
        with tqdm(names, desc=f"quantizing to {mode}", unit="tensor", leave=False, disable=None) as bar:
            for name in bar:
                t = f.get_tensor(name)  # one tensor at a time
                if name in weight_names:
                    prefix = name.removesuffix(".weight")
                    if mode == "int8":
                        tensors[name], tensors[f"{prefix}.scales"] = quantize_int8(t)
                    else:
                        check_int4_shape(t.shape[0], groupsize, prefix)
                        tensors[name], tensors[f"{prefix}.scales_and_zeros"] = quantize_int4(t, groupsize)
                elif name.endswith(EXPERT_WEIGHTS):
                    tensors.update(quantize_experts(name, t, mode, groupsize))
                else:
                    tensors[name] = t
                del t
    config = dict(config, quantization={"mode": mode, **({"groupsize": groupsize} if mode == "int4" else {})})
    extra = {
        p.name: p
        for p in checkpoint_dir.iterdir()
        if p.is_file() and p.name not in (CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG)
    }
    save_checkpoint(output_dir, config, tensors, extra, force=force)
    return output_dir


def _linear_names(config: dict):
    args = config["model_args"]
    # a mixture's feed-forward is stacked experts (quantize_experts), not Linears
    linears = [lin for lin in QUANTIZED_LINEARS if not (args.get("n_experts") and lin.startswith("feed_forward."))]
    names = [f"layers.{i}.{lin}" for i in range(args["n_layers"]) for lin in linears]
    return names + ([] if args.get("tie_embeddings") else ["output"])


# ----------------------------------------------------------------------------- KV cache


class QuantizedKVCache(nn.Module):
    """K/V stored as int8 or float8_e4m3fn with one scale per (row, head, slot); written in
    place like KVCache: half the memory of a bf16 cache (plus the scales). Decode on CUDA attends
    through kv_attention's kernel, which reads the stored values over the valid slots; every other
    step reads the whole cache dequantized to the compute dtype (read())."""

    def __init__(self, batch_size, n_kv_heads, cache_len, head_dim, storage_dtype, device=None, *, compute_dtype):
        super().__init__()
        fp8 = getattr(torch, "float8_e4m3fn", None)
        if storage_dtype == torch.int8:
            self.qmax = 127.0
        elif fp8 is not None and storage_dtype == fp8:
            self.qmax = 448.0  # e4m3's largest finite value
            check_fp8_supported(device)
        else:
            raise QuantizationError(f"unsupported KV cache storage dtype {storage_dtype}; use int8 or fp8")
        self.storage_dtype, self.compute_dtype = storage_dtype, compute_dtype
        # the smallest scale the compute dtype holds as a normal number (fp16: 6e-5)
        self.min_scale = torch.finfo(compute_dtype).tiny
        shape = (batch_size, n_kv_heads, cache_len, head_dim)
        scale_shape = (batch_size, n_kv_heads, cache_len, 1)
        for name in ("k", "v"):
            self.register_buffer(
                f"{name}_cache", torch.zeros(shape, dtype=storage_dtype, device=device), persistent=False
            )
            self.register_buffer(
                f"{name}_scale", torch.zeros(scale_shape, dtype=compute_dtype, device=device), persistent=False
            )

    def _quantize(self, x):
        """x [B, H, T, D] -> (storage-dtype values, compute-dtype scale [B, H, T, 1]): one scale per token-head."""
        x = x.float()
        # round the scale to the dtype it is stored in first, and quantize against that value
        scale = (x.abs().amax(dim=-1, keepdim=True) / self.qmax).clamp(min=self.min_scale).to(self.compute_dtype)
        q = (x / scale.float()).clamp(-self.qmax, self.qmax)
        if self.storage_dtype == torch.int8:
            q = q.round()
        return q.to(self.storage_dtype), scale

    def update(self, input_pos, k, v):
        """Write k, v [B, Hkv, T, D] at slots input_pos [T] (or [B, T]) in place, quantized. Writes only:
        a full dequantize here would run every step even where the attention reads the stored values."""
        for cache, scales, x in ((self.k_cache, self.k_scale, k), (self.v_cache, self.v_scale, v)):
            q, scale = self._quantize(x)
            if self.storage_dtype == torch.int8:
                write_slots(cache, input_pos, q)
            elif input_pos.dim() == 1:
                # fp8: index_copy_ has no float8 kernel on the CPU; index_put does. Not through a uint8
                # view: Inductor cannot write through a view of another dtype in place (it copied the
                # whole cache twice a step on the H200, 2026-12-02)
                cache[:, :, input_pos] = q
            else:  # per-row slots (speculative verify): scatter_ has no float8 kernel either
                write_slots(cache.view(torch.uint8), input_pos, q.view(torch.uint8))
            write_slots(scales, input_pos, scale)

    def read(self):
        """The whole cache dequantized to the compute dtype (never-written slots read as 0)."""
        return (self.k_cache.to(self.compute_dtype) * self.k_scale, self.v_cache.to(self.compute_dtype) * self.v_scale)

    def attends_at_decode(self) -> bool:
        return kv_attention.available(self.k_cache)

    def attend_at_decode(self, q, row_start, q_slot, sliding_window: int | None):
        """q [B, Hq, 1, D] at slot q_slot [1] over each row's valid slots -> [B, Hq, 1, D] (kv_attention)."""
        window = sliding_window or 0
        return kv_attention.quantized_decode_attention(
            q, self.k_cache, self.k_scale, self.v_cache, self.v_scale, row_start, q_slot, window
        )


def check_fp8_supported(device=None):
    """One-line QuantizationError where float8_e4m3fn casts do not work (old torch, device without them)."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise QuantizationError(f"torch {torch.__version__} has no float8_e4m3fn; use an int8 KV cache")
    if device is not None and torch.device(device).type == "meta":
        return  # shapes only; checked again where the cache is made for real
    try:
        x = torch.tensor([1.5, -300.0], device=device).to(torch.float8_e4m3fn)
        ok = x.view(torch.uint8).cpu().tolist() == [0x3C, 0xF9] and x.float().cpu().tolist() == [1.5, -288.0]
    except (RuntimeError, TypeError, NotImplementedError) as e:
        ok, why = False, first_line(e)[:120]
    else:
        why = "casts give wrong values"
    if not ok:
        where = torch.device(device or "cpu")
        raise QuantizationError(
            f"fp8 (e4m3) KV cache is not supported on {where} with torch {torch.__version__} "
            f"({why}); use an int8 KV cache"
        )


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="an unquantized checkpoint directory")
    p.add_argument(
        "--mode",
        required=True,
        choices=("int8", "int4"),
        help="int8: per-channel weights; int4: grouped weights (see --groupsize)",
    )
    p.add_argument("--groupsize", type=int, default=None, help=f"int4 group size, one of {GROUPSIZES} (default: 64)")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to write; never the source or a directory inside or around it "
        "(default: CHECKPOINT-int8 / CHECKPOINT-int4-gG)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory (default: off)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (default: off)")
    args = p.parse_args(argv)
    try:
        if args.groupsize is not None and args.mode != "int4":
            raise QuantizationError("--groupsize only applies to --mode int4")
        out = quantize_checkpoint(args.checkpoint, args.mode, args.groupsize, args.output_dir, args.force)
    except (FastgenError, OSError) as e:
        if args.debug:
            raise
        suffix = "; pass --force to overwrite it" if isinstance(e, OutputExistsError) else ""
        print(f"error: {e}{suffix}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({json.loads((out / CHECKPOINT_CONFIG).read_text())['quantization']})")
    return 0


# ----------------------------------------------------------------------------- mixture-of-experts weights

# Stacked experts ([E, out, in] per projection) are quantized per expert like a Linear, and read
# through Experts.weights(name, ids), which dequantizes only the experts a step chose (compiled,
# Inductor fuses the dequantize into the gathered matvec); int8 decode steps on a GPU go through
# gemv.int8_expert_gemv instead. The router stays in the compute dtype.
EXPERT_WEIGHTS = ("feed_forward.experts.w13", "feed_forward.experts.w2")


def quantize_experts(name: str, weight: torch.Tensor, mode: str, groupsize: int | None) -> dict:
    """The file tensors of one stacked expert weight [E, out, in]: int8 with scales [E, out], or
    int4 nibbles [E, out, in_pad/2] with scales_and_zeros [E, out, in_pad/groupsize, 2]."""
    E, out, k = weight.shape
    if mode == "int8":
        q, scales = quantize_int8(weight.reshape(E * out, k))
        return {name: q.view(E, out, k), f"{name}_scales": scales.view(E, out)}
    packed, scales_and_zeros = quantize_int4(weight.reshape(E * out, k), groupsize)
    return {
        name: packed.view(E, out, -1),
        f"{name}_scales_and_zeros": scales_and_zeros.view(-1, E, out, 2).permute(1, 2, 0, 3).contiguous(),
    }


class Int8Experts(Experts):
    """Experts whose w13 / w2 are int8 with one scale per (expert, output channel)."""

    def __init__(self, n_experts, dim, intermediate_size, device=None):
        nn.Module.__init__(self)  # buffers of its own instead of Experts' float parameters
        self.n_experts = n_experts
        for name, out, k in (("w13", 2 * intermediate_size, dim), ("w2", dim, intermediate_size)):
            self.register_buffer(name, torch.empty(n_experts, out, k, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scales", torch.empty(n_experts, out, device=device))

    def weights(self, name, ids):
        scales = getattr(self, f"{name}_scales")  # in the compute dtype (the loader casts floats)
        return getattr(self, name)[ids].to(scales.dtype) * scales[ids].unsqueeze(-1)

    def gathered(self, x, expert_ids):
        """As Experts.gathered; on a GPU each (token, expert) pair through the int8 GEMV kernel, which
        reads the chosen experts' int8 bytes once (the compiled gather-and-reduce read them at 18-34%
        of copy bandwidth on the H200, BENCHMARKS.md)."""
        N, k = expert_ids.shape
        if not gemv.available(x) or N > gemv.INT8_DOT_MAX_ROWS:  # prefill: a pair per row would re-read
            return super().gathered(x, expert_ids)
        ids = expert_ids.flatten()  # [N * k]: token n's experts at rows n * k ... n * k + k - 1
        # one token: its k experts are distinct, a GEMV each; more: tokens share experts, so group
        # the pairs by expert and read each chosen expert once for all its rows
        matmul = gemv.int8_expert_gemv if N == 1 else gemv.int8_expert_gemm_grouped
        gate, up = matmul(x, ids, self.w13, self.w13_scales).chunk(2, dim=-1)
        hidden = F.silu(gate) * up  # [N * k, I]
        return matmul(hidden, ids, self.w2, self.w2_scales).view(N, k, -1)


class Int4Experts(Experts):
    """Experts whose w13 / w2 are asymmetric int4 per group of `groupsize` inputs (quantize_int4's
    values and nibble order), dequantized in PyTorch ops: no tinygemm, whose packing is per matrix."""

    def __init__(self, n_experts, dim, intermediate_size, groupsize, device=None):
        nn.Module.__init__(self)
        self.n_experts, self.groupsize = n_experts, groupsize
        self.in_features = {"w13": dim, "w2": intermediate_size}
        for name, out, k in (("w13", 2 * intermediate_size, dim), ("w2", dim, intermediate_size)):
            k_pad = int4_padded_in_features(k, groupsize)
            self.register_buffer(name, torch.empty(n_experts, out, k_pad // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                f"{name}_scales_and_zeros", torch.empty(n_experts, out, k_pad // groupsize, 2, device=device)
            )

    def weights(self, name, ids):
        packed = getattr(self, name)[ids]  # [..., out, k_pad/2]
        sz = getattr(self, f"{name}_scales_and_zeros")[ids]  # [..., out, k_pad/g, 2], compute dtype
        q = torch.stack([packed >> 4, packed & 15], dim=-1).view(*packed.shape[:-1], -1, self.groupsize)
        w = (q.to(sz.dtype) - 8) * sz[..., :1] + sz[..., 1:]
        return w.flatten(-2)[..., : self.in_features[name]]


def quantize_experts_modules(model, quantization: dict):
    """Swap every Experts module for Int8Experts / Int4Experts (shapes only: works on the meta device)."""
    for name, experts in list(model.named_modules()):
        if type(experts) is not Experts:
            continue
        E, two_inter, dim = experts.w13.shape
        device = experts.w13.device
        if quantization["mode"] == "int8":
            new = Int8Experts(E, dim, two_inter // 2, device)
        else:
            new = Int4Experts(E, dim, two_inter // 2, quantization["groupsize"], device)
        new.to(experts.w13.dtype)  # float scales in the model's dtype, as the loader would cast them
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


if __name__ == "__main__":
    sys.exit(main())
