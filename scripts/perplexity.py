"""Perplexity on a fixed Botchan passage, and the KL divergence of each next-token
distribution from a reference checkpoint's (to measure what quantization costs).

    python scripts/perplexity.py --checkpoint checkpoints/SmolLM2-135M-Instruct
    python scripts/perplexity.py --checkpoint checkpoints/SmolLM2-135M-Instruct-int8 \
        --reference checkpoints/SmolLM2-135M-Instruct
    python scripts/perplexity.py --checkpoint checkpoints/SmolLM2-135M-Instruct --kv-cache-dtype int8 \
        --reference checkpoints/SmolLM2-135M-Instruct

The passage: Botchan (sentencepiece's test/botchan.txt), from its first line, tokenized by the
checkpoint's tokenizer, the first --tokens tokens, scored in independent windows of --window
tokens (each window starts from an empty cache; its first token is context only).
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_model  # noqa: E402
from common import DTYPES  # noqa: E402
from errors import FastgenError  # noqa: E402
from generate import KV_CACHE_DTYPES, kv_cache_class  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def botchan_ids(tokenizer, n_tokens: int) -> list[int]:
    from scripts.assets import botchan_path

    ids = tokenizer.encode(botchan_path().read_text(encoding="utf-8"))
    if len(ids) < n_tokens:
        raise FastgenError(f"Botchan has only {len(ids)} tokens; ask for fewer")
    return ids[:n_tokens]


@torch.no_grad()
def window_logits(model, ids: list[int], window: int, kv_cache_dtype=None):
    """Yield (logits [window, V] fp32, targets [window - 1]) for each window of the passage."""
    device = model.tok_embeddings.weight.device
    model.setup_caches(1, window, kv_cache_dtype, kv_cache_class(kv_cache_dtype, model.tok_embeddings.weight.dtype))
    model.set_row_starts(torch.zeros(1, dtype=torch.int32, device=device))
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]], device=device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk, torch.arange(chunk.shape[1], device=device))[0]
        yield logits[:-1], chunk[0, 1:]


@torch.no_grad()
def evaluate(checkpoint, ids, window=1024, dtype=torch.float32, kv_cache_dtype=None, reference=None, device="cpu"):
    """{"perplexity": ..., "kl": mean KL(reference || this) per token or None, "tokens": scored}."""
    model, _ = load_model(checkpoint, device, dtype)
    # the reference is always fp32 with an fp32 cache: what every other row is measured against
    ref_model = load_model(reference, device, torch.float32)[0] if reference is not None else None
    nll, kl, count = 0.0, 0.0, 0
    ref_windows = window_logits(ref_model, ids, window) if ref_model is not None else None
    for logits, targets in window_logits(model, ids, window, kv_cache_dtype):
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll += -logp.gather(-1, targets[:, None]).sum().item()
        if ref_windows is not None:
            ref_logp = torch.log_softmax(next(ref_windows)[0].float(), dim=-1)
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        count += targets.numel()
    return {"perplexity": math.exp(nll / count), "kl": kl / count if ref_model is not None else None, "tokens": count}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--reference", type=Path, default=None, help="checkpoint to measure KL divergence from")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--kv-cache-dtype", default=None, choices=sorted(KV_CACHE_DTYPES))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.checkpoint)
        ids = botchan_ids(tokenizer, args.tokens)
        r = evaluate(
            args.checkpoint,
            ids,
            args.window,
            DTYPES[args.dtype],
            KV_CACHE_DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None,
            args.reference,
            args.device,
        )
    except (FastgenError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kl = f", KL from reference {r['kl']:.5f} nats/token" if r["kl"] is not None else ""
    print(f"{args.checkpoint}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens{kl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
