"""Write a checkpoint of random weights at a named model's real shapes, with a word-level
tokenizer.json that covers its whole vocabulary ("w0 w1 ..."): what the start-up and package
benchmarks load from local disk on a machine where nothing can be downloaded.

python scripts/random_checkpoint.py --model llama-3-8b --output /tmp/llama-3-8b-random --device cuda
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_ours import build_model, named_args  # noqa: E402

from checkpoint import CONFIGS, save_checkpoint  # noqa: E402
from common import DTYPES  # noqa: E402


def word_level_tokenizer(vocab_size: int) -> str:
    """A tokenizer.json whose ids are the words w0 .. w{vocab_size-1}, split on whitespace."""
    return json.dumps(
        {
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": {f"w{i}": i for i in range(vocab_size)}, "unk_token": "w0"},
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "decoder": None,
            "added_tokens": [],
        }
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(CONFIGS), help="a named config of checkpoint.py")
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="the checkpoint directory to write")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default: bf16)")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (default: cpu)")
    p.add_argument("--layers", type=int, default=0, help="the named shape with this many layers (default: its own)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model_args = named_args(args.model, args.layers)
    model = build_model(args.model, "bf16", torch.device(args.device), DTYPES[args.dtype], model_args)
    tensors = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    save_checkpoint(
        args.output,
        {"model_args": asdict(model_args), "quantization": None},
        tensors,
        {"tokenizer.json": word_level_tokenizer(model_args.vocab_size)},
        force=args.force,
    )
    layers = f", {model_args.n_layers} layers" if args.layers else ""
    print(f"Wrote {args.output} ({args.model}{layers}, random {args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
