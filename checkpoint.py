"""Model configs and checkpoint files: everything between a directory on disk and a Transformer.

model.py is the model alone and reads top to bottom as one; what a model is called (the named
CONFIGS), how a Hugging Face config.json maps onto ModelArgs, and how our checkpoint directory is
written and read live here. This file imports model.py, never the reverse.

Our checkpoint directory: config.json {"model_args": {...}, "quantization": null | {...}},
model.safetensors with the parameter names of Transformer.state_dict(), and the tokenizer
file(s) beside them.
"""

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from errors import FastgenError, first_line
from model import ModelArgs, Transformer, rope_inv_freq

# ----------------------------------------------------------------------------- configs

_LLAMA3_1_ROPE = {
    "type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA3_2_ROPE = dict(_LLAMA3_1_ROPE, factor=32.0)

CONFIGS = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "codellama-7b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        intermediate_size=11008,
        vocab_size=32016,
        rope_base=1e6,
        max_position_embeddings=16384,
    ),
    "codellama-34b": dict(
        dim=8192,
        n_layers=48,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=22016,
        rope_base=1e6,
        max_position_embeddings=16384,
    ),
    "llama-3-8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=8192,
    ),
    "llama-3-70b": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=8192,
    ),
    "llama-3.1-8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA3_1_ROPE,
    ),
    "llama-3.1-70b": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA3_1_ROPE,
    ),
    "llama-3.1-405b": dict(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        intermediate_size=53248,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA3_1_ROPE,
    ),
    "llama-3.2-1b": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA3_2_ROPE,
        tie_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        rope_base=500000.0,
        max_position_embeddings=131072,
        rope_scaling=_LLAMA3_2_ROPE,
        tie_embeddings=True,
    ),
    "mistral-7b-v0.1": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
    "mistral-7b-v0.3": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        rope_base=1e6,
        max_position_embeddings=32768,
    ),
    "qwen2.5-0.5b": dict(
        dim=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=32768,
        qkv_bias=True,
        tie_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        dim=1536,
        n_layers=28,
        n_heads=12,
        n_kv_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=32768,
        qkv_bias=True,
        tie_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        dim=2048,
        n_layers=36,
        n_heads=16,
        n_kv_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=32768,
        qkv_bias=True,
        tie_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        dim=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=32768,
        qkv_bias=True,
    ),
    "qwen3-0.6b": dict(
        dim=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
        tie_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        dim=2048,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
        tie_embeddings=True,
    ),
    "qwen3-4b": dict(
        dim=2560,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=9728,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
        tie_embeddings=True,
    ),
    "qwen3-8b": dict(
        dim=4096,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
    ),
    # Mixture of experts: intermediate_size is each expert's.
    "mixtral-8x7b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        intermediate_size=14336,
        rope_base=1e6,
        max_position_embeddings=32768,
        n_experts=8,
        n_active_experts=2,
    ),
    "mixtral-8x22b": dict(
        dim=6144,
        n_layers=56,
        n_heads=48,
        n_kv_heads=8,
        intermediate_size=16384,
        rope_base=1e6,
        max_position_embeddings=65536,
        n_experts=8,
        n_active_experts=2,
    ),
    "qwen3-30b-a3b": dict(
        dim=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        head_dim=128,
        intermediate_size=768,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
        n_experts=128,
        n_active_experts=8,
    ),
    "qwen3-235b-a22b": dict(
        dim=4096,
        n_layers=94,
        n_heads=64,
        n_kv_heads=4,
        head_dim=128,
        intermediate_size=1536,
        vocab_size=151936,
        norm_eps=1e-6,
        rope_base=1e6,
        max_position_embeddings=40960,
        qk_norm=True,
        n_experts=128,
        n_active_experts=8,
    ),
    "smollm2-135m": dict(
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        rope_base=100000.0,
        max_position_embeddings=8192,
        tie_embeddings=True,
    ),
    "smollm2-360m": dict(
        dim=960,
        n_layers=32,
        n_heads=15,
        n_kv_heads=5,
        intermediate_size=2560,
        vocab_size=49152,
        rope_base=100000.0,
        max_position_embeddings=8192,
        tie_embeddings=True,
    ),
    "smollm2-1.7b": dict(
        dim=2048,
        n_layers=24,
        n_heads=32,
        n_kv_heads=32,
        intermediate_size=8192,
        vocab_size=49152,
        rope_base=130000.0,
        max_position_embeddings=8192,
        tie_embeddings=True,
    ),
}


def model_args_from_name(name: str) -> ModelArgs:
    if name not in CONFIGS:  # exact names only: never guess a model from a path
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
    return ModelArgs(**CONFIGS[name])


def model_args_from_dict(d: dict) -> ModelArgs:
    """ModelArgs from a checkpoint's config.json "model_args"; an unknown field is an error, not ignored."""
    known = {f.name for f in fields(ModelArgs)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown ModelArgs fields {sorted(unknown)}")
    return ModelArgs(**d)


HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


def moe_args_from_hf_config(cfg: dict) -> dict:
    """The mixture-of-experts fields of a Mixtral / Qwen3-MoE config.json. Every routing option we
    do not implement is an error here, never silently dropped."""
    model_type = cfg["model_type"]
    n_experts = cfg.get("num_local_experts") if model_type == "mixtral" else cfg.get("num_experts")
    n_experts = n_experts or cfg.get("num_local_experts")  # transformers 5 writes this name for both
    if not n_experts:
        raise ValueError(f"{model_type} config has no num_experts / num_local_experts")
    if cfg.get("router_jitter_noise", 0.0):
        raise ValueError(f"router_jitter_noise={cfg['router_jitter_noise']} is not supported (use 0)")
    if cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts"):
        raise ValueError("shared experts (shared_expert_intermediate_size / n_shared_experts) are not supported")
    if model_type == "qwen3_moe":
        # Mixtral's routing (softmax over the top-k logits) is Qwen3's with norm_topk_prob=true
        if not cfg.get("norm_topk_prob", False):
            raise ValueError("norm_topk_prob=false (unnormalised top-k weights) is not supported")
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            raise ValueError(
                "dense layers among the MoE ones (decoder_sparse_step != 1, mlp_only_layers) are not supported"
            )
    return dict(
        n_experts=int(n_experts),
        n_active_experts=int(cfg["num_experts_per_tok"]),
        intermediate_size=cfg["moe_intermediate_size"] if model_type == "qwen3_moe" else cfg["intermediate_size"],
    )


def model_args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json of a Llama-architecture model (dense or MoE)."""
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(HF_MODEL_TYPES)})")
    # transformers >= 5 nests rope settings in rope_parameters; older configs use rope_theta/rope_scaling
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_base = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        rope_scaling = None
    elif rope_type == "linear":
        rope_scaling = {"type": "linear", "factor": float(rope["factor"])}
    elif rope_type == "llama3":
        rope_scaling = {
            "type": "llama3",
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
        }
    else:
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: linear, llama3)")
    # Mistral and Mixtral always honour sliding_window (null in v0.3); Qwen configs carry one they do not use.
    honours_window = model_type in ("mistral", "mixtral")
    if not honours_window and cfg.get("use_sliding_window", False):
        raise ValueError("per-layer sliding windows (use_sliding_window with max_window_layers) are not supported")
    sliding_window = cfg.get("sliding_window") if honours_window else None
    if model_type in ("llama", "mistral", "mixtral", "qwen3_moe") and cfg.get("attention_bias", False):
        raise ValueError("attention_bias=true (biases on q/k/v and o_proj) is not supported")
    if cfg.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported")
    n_heads = cfg["num_attention_heads"]
    moe = moe_args_from_hf_config(cfg) if model_type in ("mixtral", "qwen3_moe") else {}
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        intermediate_size=moe.pop("intermediate_size", cfg["intermediate_size"]),
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_base=float(rope_base),
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        sliding_window=sliding_window,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **moe,
    )


# ----------------------------------------------------------------------------- checkpoint files

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"


class CheckpointError(FastgenError):
    """A checkpoint that cannot be used or written; the message names the file and what is wrong."""


class OutputExistsError(CheckpointError):
    """The output directory exists and overwriting was not asked for (a CLI adds how to ask)."""


def check_output_dir(source, out_dir, force: bool, what: str = "the source"):
    """Refuse an output directory that overlaps the source (always: writing it replaces the whole
    directory) or that exists without `force`. Checked before reading gigabytes."""
    overlap = output_overlap(source, out_dir)
    if overlap:  # before "exists": force must never be the way past it
        raise CheckpointError(f"output directory {out_dir} {overlap} {what} {source}; choose a directory outside it")
    if Path(out_dir).exists() and not force:
        raise OutputExistsError(f"{out_dir} already exists")


def output_overlap(source, output) -> str | None:
    """How `output` overlaps `source` ("is", "is inside" or "contains"), or None when they are apart.

    Writing a checkpoint replaces its whole output directory, so an output that is the source,
    holds it, or lies inside it would destroy the source (with force) or mix the two.
    """
    # Compared both as written (a symlinked source inside the output would be deleted) and resolved
    # (`.`, `..` and symlinks cannot hide that two paths are one place).
    for src, out in (
        (Path(os.path.abspath(source)), Path(os.path.abspath(output))),
        (Path(source).resolve(), Path(output).resolve()),
    ):
        if out == src:
            return "is"
        if out.is_relative_to(src):
            return "is inside"
        if src.is_relative_to(out):
            return "contains"
    return None


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
}


@dataclass
class TensorStream:
    """Tensors produced one at a time, for a checkpoint bigger than memory: `specs` (name ->
    (shape, dtype)) are known up front, `tensors` yields (name, tensor) in the specs' order."""

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    tensors: Iterator[tuple[str, torch.Tensor]]


def write_safetensors_stream(path, stream: TensorStream):
    """A safetensors file written tensor by tensor: the header (every offset follows from the specs)
    first, then each tensor's bytes as it arrives, so one tensor at a time is in memory."""
    header, offset = {}, 0
    for name, (shape, dtype) in stream.specs.items():
        size = dtype.itemsize
        for d in shape:
            size *= d
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        names = iter(stream.specs)
        for name, t in stream.tensors:
            expected = next(names, None)
            shape, dtype = stream.specs.get(name, (None, None))
            # the producer's bug, not the user's: the header already promised these
            assert name == expected and tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, expected)
            f.write(t.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
        assert next(names, None) is None, "the stream ended early"


def save_checkpoint(
    out_dir,
    config: dict,
    tensors: dict[str, torch.Tensor] | TensorStream,
    extra_files: dict[str, str | bytes | Path] = None,
    force: bool = False,
):
    """Write a checkpoint directory atomically: everything goes into a temp dir that is renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        if isinstance(tensors, TensorStream):
            write_safetensors_stream(tmp / CHECKPOINT_WEIGHTS, tensors)
        else:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / CHECKPOINT_WEIGHTS))
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
        # mkdtemp makes a private (0700) directory; a checkpoint gets the usual permissions
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_checkpoint_config(checkpoint_dir) -> dict:
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / CHECKPOINT_CONFIG
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; convert a model first (see README: scripts/convert_hf_checkpoint.py)"
        )
    try:
        config = json.loads(path.read_text())
        model_args_from_dict(config["model_args"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid checkpoint config: {e}") from None
    return config


CPU_KERNEL_ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every tensor


def load_checkpoint_tensors(
    checkpoint_dir, expected: dict[str, torch.Tensor], device, dtype, shard=None
) -> dict[str, torch.Tensor]:
    """Read model.safetensors lazily (memory-mapped), checking every name and shape against `expected`.

    Floating-point tensors are cast to `dtype`; integer tensors (quantized weights) keep theirs.
    shard (tensor parallel, tp.Shard): `expected` holds this rank's slices; read only those.
    """
    from safetensors import safe_open

    path = Path(checkpoint_dir) / CHECKPOINT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    out = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing:
                raise CheckpointError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all)")
            if unexpected:
                raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
            for name, ref in expected.items():
                shape = tuple(f.get_slice(name).get_shape())
                want = shard.full_shape(name, ref.shape) if shard else tuple(ref.shape)  # tensor parallel
                if shape != want:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {list(shape)} but the config expects {list(want)}"
                    )
                t = shard.read(name, f.get_slice(name)) if shard else f.get_tensor(name)
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                if t.device.type == "cpu" and not t.is_floating_point() and t.data_ptr() % CPU_KERNEL_ALIGNMENT:
                    # a quantized weight still viewed in the memory map, at the file's offset: torch's
                    # CPU int8 kernel (quantize.Int8Linear) crashes on unaligned rows, so copy it out
                    t = t.clone()
                out[name] = t
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {first_line(e)})") from None
    return out


def load_model(checkpoint_dir, device, dtype, shard=None) -> tuple[Transformer, dict]:
    """Build the model on the meta device and fill it from the memory-mapped checkpoint, so
    loading never holds two copies of the weights.

    shard (tensor parallel, tp.Shard): build this rank's slice of the model instead, read only
    its part of each tensor, and add the all-reduces that join the ranks' partial outputs."""
    config = read_checkpoint_config(checkpoint_dir)
    args = model_args_from_dict(config["model_args"])
    if shard:  # tensor parallel: this rank's slice (fewer heads, narrower MLP)
        args = shard.local_args(args, config.get("quantization"))
    with torch.device("meta"):
        model = Transformer(args)
        quantization = config.get("quantization")
        if quantization:
            from quantize import apply_quantization  # only quantized checkpoints need it

            apply_quantization(model, quantization, device)
    tensors = load_checkpoint_tensors(checkpoint_dir, model.state_dict(), device, dtype, shard)
    model.load_state_dict(tensors, assign=True, strict=True)
    if shard:
        shard.add_all_reduces(model)
    # non-persistent buffers are not in the file: make them on the device
    model.inv_freq = rope_inv_freq(args).to(device)
    model.row_start = torch.zeros(0, dtype=torch.int32, device=device)
    return model.eval(), config
