"""Convert a Hugging Face Llama-family checkpoint directory (dense, Mixtral or Qwen3-MoE) into ours.

    python scripts/convert_hf_checkpoint.py --checkpoint-dir HF_DIR [--output-dir OUT] [--dtype bf16] [--force]

Reads HF config.json (-> checkpoint.model_args_from_hf_config) and the weights (sharded or single
*.safetensors, or pytorch_model*.bin), renames them to Transformer.state_dict() names,
fuses q/k/v into wqkv and gate/up into w13, stacks a mixture's experts into one tensor per
projection ([E, 2I, D] and [E, D, I]), and writes config.json + model.safetensors + the
tokenizer files. It streams: source tensors are read from memory-mapped files and each output
tensor is written as soon as it is made, so memory holds about one layer's experts, never the model.
"""

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import (  # noqa: E402
    CheckpointError,
    TensorStream,
    check_output_dir,
    model_args_from_hf_config,
    save_checkpoint,
)
from common import DTYPES  # noqa: E402
from errors import first_line  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from scripts.converter_cli import converter_main  # noqa: E402

# chat_template.jinja: where newer transformers keep the chat template (tokenizer.py reads it)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class _HFWeights:
    """Name -> tensor over all weight files of an HF checkpoint, opened lazily (memory-mapped)."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        self.where: dict[str, Path] = {}  # tensor name -> file holding it
        self._open: dict[Path, object] = {}
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index, single_path = hf_dir / index_name, hf_dir / single
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index} is not a valid weight index ({e})") from None
                self.where = {name: hf_dir / f for name, f in weight_map.items()}
                break
            if single_path.is_file():
                self.where = {name: single_path for name in self._file(single_path).keys()}
                break
        else:
            raise CheckpointError(
                f"{hf_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found"
            )

    def _file(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{path} is missing (listed in the weight index)")
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[path] = safe_open(str(path), framework="pt", device="cpu")
                else:
                    self._open[path] = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # truncated / corrupt files surface as many error types
                raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {first_line(e)})") from None
        return self._open[path]

    def get(self, name: str) -> torch.Tensor:
        path = self.where.get(name)
        if path is None:
            raise CheckpointError(f"{self.hf_dir}: missing tensor {name}")
        try:
            f = self._file(path)
            return f.get_tensor(name) if path.suffix == ".safetensors" else f[name]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({type(e).__name__}: {first_line(e)})") from None

    def close(self):
        self._open.clear()


def _experts_mapping(args: ModelArgs, model_type: str, hf: str, ours: str):
    """A mixture's router and stacked experts: the E experts' tensors concatenated along dim 0
    are our [E, ...] tensor (w13 = gate_0, up_0, gate_1, up_1, ...)."""
    dim, inter = args.dim, args.intermediate_size
    if model_type == "mixtral":  # w1 = gate, w3 = up, w2 = down
        moe, gate, up, down = hf + "block_sparse_moe.", "w1", "w3", "w2"
    else:
        moe, gate, up, down = hf + "mlp.", "gate_proj", "up_proj", "down_proj"
    experts = [f"{moe}experts.{e}." for e in range(args.n_experts)]
    yield ours + "feed_forward.gate.weight", [(moe + "gate.weight", (args.n_experts, dim))]
    yield (
        ours + "feed_forward.experts.w13",
        [(e + p + ".weight", (inter, dim)) for e in experts for p in (gate, up)],
    )
    yield ours + "feed_forward.experts.w2", [(e + down + ".weight", (dim, inter)) for e in experts]


def _mapping(args: ModelArgs, model_type: str = "llama"):
    """Yield (layer index or None, our name, [(hf name, expected shape)]) in file order.

    Several HF names for one of ours are concatenated along dim 0 and shaped like ours (wqkv, w13,
    stacked experts)."""
    q, kv, hd, dim, inter = (
        args.n_heads * args.head_dim,
        args.n_kv_heads * args.head_dim,
        args.head_dim,
        args.dim,
        args.intermediate_size,
    )
    yield None, "tok_embeddings.weight", [("model.embed_tokens.weight", (args.vocab_size, dim))]
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        yield (
            i,
            ours + "attention.wqkv.weight",
            [
                (attn + "q_proj.weight", (q, dim)),
                (attn + "k_proj.weight", (kv, dim)),
                (attn + "v_proj.weight", (kv, dim)),
            ],
        )
        if args.qkv_bias:
            yield (
                i,
                ours + "attention.wqkv.bias",
                [(attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)), (attn + "v_proj.bias", (kv,))],
            )
        yield i, ours + "attention.wo.weight", [(attn + "o_proj.weight", (dim, q))]
        if args.qk_norm:
            yield i, ours + "attention.q_norm.weight", [(attn + "q_norm.weight", (hd,))]
            yield i, ours + "attention.k_norm.weight", [(attn + "k_norm.weight", (hd,))]
        if args.n_experts:
            for name, sources in _experts_mapping(args, model_type, hf, ours):
                yield i, name, sources
        else:
            yield (
                i,
                ours + "feed_forward.w13.weight",
                [(hf + "mlp.gate_proj.weight", (inter, dim)), (hf + "mlp.up_proj.weight", (inter, dim))],
            )
            yield i, ours + "feed_forward.w2.weight", [(hf + "mlp.down_proj.weight", (dim, inter))]
        yield i, ours + "attention_norm.weight", [(hf + "input_layernorm.weight", (dim,))]
        yield i, ours + "ffn_norm.weight", [(hf + "post_attention_layernorm.weight", (dim,))]
    yield None, "norm.weight", [("model.norm.weight", (dim,))]
    if not args.tie_embeddings:
        yield None, "output.weight", [("lm_head.weight", (args.vocab_size, dim))]


EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.")


def check_expert_counts(weights: "_HFWeights", args: ModelArgs, cfg: dict, mapping):
    """Every layer holds exactly the config's number of experts; else name a tensor and both counts."""
    key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    found: dict[int, set[int]] = {}
    for name in weights.where:
        m = EXPERT_TENSOR.match(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    wanted = {hf_name for _, _, sources in mapping for hf_name, _ in sources}
    for layer in range(args.n_layers):
        count = len(found.get(layer, ()))
        if count == args.n_experts:
            continue
        prefix = f"model.layers.{layer}."
        missing = sorted(n for n in wanted if n.startswith(prefix) and n not in weights.where and ".experts." in n)
        extra = sorted(n for n in weights.where if n.startswith(prefix) and n not in wanted and ".experts." in n)
        tensor = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}" if extra else "tensors"
        raise CheckpointError(
            f"{weights.hf_dir}: {tensor}: layer {layer} has {count} experts but config.json says {key}={args.n_experts}"
        )


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {hf_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is {hf_dir} a Hugging Face checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def convert_hf_checkpoint(hf_dir, out_dir=None, dtype=None, force: bool = False, source: str | None = None) -> Path:
    """Convert HF checkpoint `hf_dir` into our format at `out_dir` (default checkpoints/<name>).

    dtype: torch dtype, or one of "bf16"/"fp16"/"fp32"; None keeps the dtype of the embedding.
    Raises CheckpointError (a one-line message naming the file) on any problem; nothing is
    left behind then. Returns the output directory.
    """
    hf_dir = Path(hf_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path("checkpoints") / hf_dir.resolve().name
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    check_output_dir(hf_dir, out_dir, force)
    cfg = read_hf_config(hf_dir)
    try:
        args = model_args_from_hf_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{hf_dir / 'config.json'}: {msg}") from None
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{hf_dir / 'config.json'}: mlp_bias=true is not supported")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}

    weights = _HFWeights(hf_dir)
    if dtype is None:
        dtype = weights.get("model.embed_tokens.weight").dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
    mapping = list(_mapping(args, cfg.get("model_type")))
    if args.n_experts:
        check_expert_counts(weights, args, cfg, mapping)
    used = {hf_name for _, _, sources in mapping for hf_name, _ in sources}
    if args.tie_embeddings and "lm_head.weight" in weights.where:
        # HF ties these on load and ignores the stored copy; so do we.
        used.add("lm_head.weight")
    unused = sorted(n for n in weights.where if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise CheckpointError(
            f"{weights.where[unused[0]]}: unexpected tensor {unused[0]} ({len(unused)} unused in "
            f"all); this model variant is not supported"
        )

    def converted():
        """Our tensors one at a time, in file order: memory holds one of them (a layer's experts)."""
        # One bar on a terminal (none in logs), not a line per layer; cleared when done or on an error.
        with tqdm(mapping, desc="converting", unit="tensor", leave=False, disable=None) as bar:
            for _, name, sources in bar:
                parts = []
                for hf_name, shape in sources:
                    t = weights.get(hf_name)
                    if tuple(t.shape) != tuple(shape):
                        raise CheckpointError(
                            f"{weights.where[hf_name]}: tensor {hf_name} has shape {list(t.shape)} but "
                            f"config.json implies {list(shape)}"
                        )
                    parts.append(t.to(dtype))
                t = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)
                yield name, t.view(expected[name])

    print(f"converting {hf_dir} ({cfg.get('model_type')}, {args.n_layers} layers) to {out_dir} in {dtype}", flush=True)
    stream = TensorStream({name: (tuple(expected[name]), dtype) for _, name, _ in mapping}, converted())
    assert set(stream.specs) == set(expected), set(stream.specs) ^ set(expected)

    extra = {f: hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()}
    # the source directory's name only: a local path would leak into checkpoints people share
    config = {"model_args": dataclasses.asdict(args), "quantization": None, "source": source or hf_dir.resolve().name}
    save_checkpoint(out_dir, config, stream, extra, force=force)
    weights.close()
    print(
        f"wrote {out_dir} ({sum(torch.Size(shape).numel() for shape, _ in stream.specs.values()) / 1e6:.1f}M "
        f"parameters, "
        f"tokenizer files: {', '.join(extra) or 'none'})",
        flush=True,
    )
    return out_dir


def main(argv=None):
    converter_main(
        argv,
        __doc__.split("\n\n")[0],
        convert_hf_checkpoint,
        "--checkpoint-dir",
        "Hugging Face checkpoint directory",
        "where to write (default: checkpoints/<checkpoint dir name>)",
        "weights' dtype (default: as stored)",
    )


if __name__ == "__main__":
    main()
