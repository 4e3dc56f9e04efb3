"""Convert a GGUF file (llama / qwen2 / qwen3 / qwen3moe architecture, Mixtral as llama) into our checkpoint format.

    python scripts/convert_gguf.py --gguf FILE --output-dir OUT [--dtype fp32|bf16|fp16] [--force]

Weights are dequantized with the `gguf` package (whatever quant types it supports: F32, F16,
BF16, Q8_0, Q4_0, Q4_1, K-quants, ...), so the result is a plain float checkpoint holding
exactly the values the quantized file encodes. ModelArgs come from the GGUF metadata; the
tokenizer embedded in the file is written as tokenizer.json + tokenizer_config.json. A mixture
of experts comes as llama.cpp's stacked blk.N.ffn_{gate,up,down}_exps tensors ([E, ...]).
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import CheckpointError, check_output_dir, save_checkpoint  # noqa: E402
from common import DTYPES  # noqa: E402
from errors import FastgenError, first_line  # noqa: E402
from model import ModelArgs, Transformer, rope_inv_freq  # noqa: E402
from scripts.converter_cli import converter_main  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")


def _open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated / corrupt files fail in many ways inside the reader
        raise CheckpointError(
            f"{path} is not a readable GGUF file (truncated or corrupt? {type(e).__name__}: {first_line(e)})"
        ) from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747e-06. Use float32's shortest repr.
    return float(str(np.float32(x)))


def gguf_model_args(reader, path: Path, tensors: dict) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHS)})")

    def req(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    dim, n_heads = int(req("embedding_length")), int(req("attention.head_count"))
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor token_embd.weight")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims are [in, out]: rows are last
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    if n_tokens is not None and n_tokens > vocab_size:
        raise CheckpointError(f"{path}: {n_tokens} tokens but token_embd.weight has only {vocab_size} rows")
    rope_scaling = None
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": _f32(req("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported rope scaling type {scaling_type!r}")
    n_experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    moe = {}
    if n_experts:
        if _field(reader, f"{arch}.expert_shared_count", 0):
            raise CheckpointError(f"{path}: shared experts ({arch}.expert_shared_count) are not supported")
        if _field(reader, f"{arch}.expert_weights_norm", True) is False:
            raise CheckpointError(
                f"{path}: unnormalised top-k expert weights ({arch}.expert_weights_norm) are not supported"
            )
        if _field(reader, f"{arch}.expert_gating_func", 1) != 1:  # llama.cpp: 1 = softmax
            raise CheckpointError(
                f"{path}: expert gating other than softmax ({arch}.expert_gating_func) is not supported"
            )
        moe = dict(n_experts=n_experts, n_active_experts=int(req("expert_used_count")))
        if arch == "qwen3moe":  # its feed_forward_length is the dense size, unused
            moe["intermediate_size"] = int(req("expert_feed_forward_length"))
    args = ModelArgs(
        dim=dim,
        n_layers=int(req("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", dim // n_heads)),
        intermediate_size=moe.pop("intermediate_size", None) or int(req("feed_forward_length")),
        vocab_size=vocab_size,
        norm_eps=_f32(req("attention.layer_norm_rms_epsilon")),
        rope_base=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tie_embeddings="output.weight" not in tensors,
        **moe,
    )
    if "rope_freqs.weight" in tensors:  # llama.cpp stores Llama-3.1 rope scaling as per-frequency factors
        args = _llama3_rope_from_factors(args, _dequantize(tensors["rope_freqs.weight"], path), path)
    return args


def _llama3_rope_from_factors(args: ModelArgs, factors: torch.Tensor, path: Path) -> ModelArgs:
    """Recover Llama-3 rope scaling parameters from llama.cpp's rope_freqs factors (checked, not guessed)."""
    plain = rope_inv_freq(dataclasses.replace(args, rope_scaling=None))
    for orig in (8192, 4096, 16384, 2048, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            scaling = {
                "type": "llama3",
                "factor": float(factors.max()),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": orig,
            }
            candidate = dataclasses.replace(args, rope_scaling=scaling)
            if torch.allclose(plain / rope_inv_freq(candidate), factors.float(), rtol=1e-3):
                return candidate
    raise CheckpointError(f"{path}: rope_freqs.weight does not match any Llama-3 rope scaling we recognise")


def _dequantize(t, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        data = dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}; {type(e).__name__}: {first_line(e)})"
        ) from None
    # GGUF lists dims innermost first; the dequantized array is row-major [out, in].
    shape = tuple(int(d) for d in reversed(t.shape))
    if tuple(data.shape) != shape:
        raise CheckpointError(
            f"{path}: tensor {t.name} dequantized to shape {list(data.shape)}, expected {list(shape)}"
        )
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not data.flags.writeable:  # an F32 tensor is a view of the reader's read-only memmap: copy it out
        data = data.copy()
    return torch.from_numpy(data)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: Meta interleaved RoPE pairs -> HF rotate-half halves.

    llama.cpp maps each head's rows [first half; second half] to interleaved pairs with
    reshape(n_heads, 2, hd/2, ...).swapaxes(1, 2); this is its inverse."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _mapping(args: ModelArgs):
    """Yield (our name, [gguf names concatenated along the output features])."""
    yield "tok_embeddings.weight", ["token_embd.weight"]
    for i in range(args.n_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        yield o + "attention.wqkv.weight", [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"]
        if args.qkv_bias:
            yield o + "attention.wqkv.bias", [b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias"]
        yield o + "attention.wo.weight", [b + "attn_output.weight"]
        if args.qk_norm:
            yield o + "attention.q_norm.weight", [b + "attn_q_norm.weight"]
            yield o + "attention.k_norm.weight", [b + "attn_k_norm.weight"]
        if args.n_experts:  # stacked [E, out, in]
            yield o + "feed_forward.gate.weight", [b + "ffn_gate_inp.weight"]
            yield o + "feed_forward.experts.w13", [b + "ffn_gate_exps.weight", b + "ffn_up_exps.weight"]
            yield o + "feed_forward.experts.w2", [b + "ffn_down_exps.weight"]
        else:
            yield o + "feed_forward.w13.weight", [b + "ffn_gate.weight", b + "ffn_up.weight"]
            yield o + "feed_forward.w2.weight", [b + "ffn_down.weight"]
        yield o + "attention_norm.weight", [b + "attn_norm.weight"]
        yield o + "ffn_norm.weight", [b + "ffn_norm.weight"]
    yield "norm.weight", ["output_norm.weight"]
    if not args.tie_embeddings:
        yield "output.weight", ["output.weight"]


def convert_gguf(gguf_path, out_dir, dtype=None, force: bool = False) -> Path:
    """Convert `gguf_path` into our checkpoint at `out_dir`. dtype: torch dtype or "fp32"/"bf16"/"fp16"
    (None: fp32, what dequantization yields). Raises CheckpointError with a one-line message."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
    check_output_dir(gguf_path, out_dir, force)
    reader = _open_gguf(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    args = gguf_model_args(reader, gguf_path, tensors)
    arch = _field(reader, "general.architecture")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    print(f"converting {gguf_path.name} ({arch}, {args.n_layers} layers) to {out_dir} in {dtype}", flush=True)

    out, used = {}, {"rope_freqs.weight"}
    # One bar on a terminal (none in logs), not a line per layer; cleared when done or on an error.
    with tqdm(list(_mapping(args)), desc="converting", unit="tensor", leave=False, disable=None) as bar:
        for name, sources in bar:
            parts = []
            for src in sources:
                if src not in tensors:
                    raise CheckpointError(f"{gguf_path}: missing tensor {src}")
                w = _dequantize(tensors[src], gguf_path)
                if arch == "llama" and src.endswith(("attn_q.weight", "attn_k.weight")):
                    w = unpermute_rope(w, args.n_heads if "attn_q" in src else args.n_kv_heads)
                parts.append(w.to(dtype))
                used.add(src)
            # along the output features: dim 0 of a matrix or vector, dim 1 of stacked experts
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=max(parts[0].dim() - 2, 0))
            holds_experts = ".experts." in name or name.endswith("feed_forward.gate.weight")  # [E, ...]
            if holds_experts and t.shape[0] != expected[name][0]:
                raise CheckpointError(
                    f"{gguf_path}: tensor {sources[0]} holds {t.shape[0]} experts but the metadata "
                    f"({arch}.expert_count) says {expected[name][0]}"
                )
            if tuple(t.shape) != expected[name]:
                raise CheckpointError(
                    f"{gguf_path}: {'+'.join(sources)} has shape {list(t.shape)} but the metadata "
                    f"implies {list(expected[name])} for {name}"
                )
            out[name] = t
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(
            f"{gguf_path}: unexpected tensor {unused[0]} ({len(unused)} unused in all); "
            f"this model variant is not supported"
        )

    extra = {}
    try:
        from tokenizer import gguf_tokenizer_files

        extra = gguf_tokenizer_files(reader)
    except (ImportError, FastgenError) as e:  # tokenizer.TokenizerError
        print(f"warning: no tokenizer written ({first_line(e)}); pass one to generate.py yourself", file=sys.stderr)
    config = {
        "model_args": dataclasses.asdict(args),
        "quantization": None,
        "source": f"gguf:{gguf_path.name} ({_field(reader, 'general.name', '?')})",
    }
    save_checkpoint(out_dir, config, out, extra, force=force)
    print(
        f"wrote {out_dir} ({sum(t.numel() for t in out.values()) / 1e6:.1f}M parameters, "
        f"tokenizer files: {', '.join(extra) or 'none'})",
        flush=True,
    )
    return out_dir


def main(argv=None):
    converter_main(
        argv,
        __doc__.split("\n\n")[0],
        convert_gguf,
        "--gguf",
        "the .gguf file",
        "the checkpoint directory to write",
        "weights' dtype (default: fp32)",
        output_required=True,
    )


if __name__ == "__main__":
    main()
