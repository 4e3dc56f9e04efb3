"""What quantization costs, measured: perplexity on a fixed Botchan passage and the mean KL
divergence of every next-token distribution from the unquantized fp32 model, for each weight
and KV-cache quantization, printed as a markdown table.

    python scripts/eval_quant.py --checkpoint checkpoints/SmolLM2-135M-Instruct

The passage is the one of scripts/perplexity.py: Botchan from its first line, the first --tokens
tokens, scored in independent windows of --window tokens (each from an empty cache). The
quantized checkpoints are made with quantize.py into a temporary directory (or --work-dir, kept).
Everything runs on the CPU in fp32 unless a row says otherwise; the int4 kernels take bf16
activations whatever the compute dtype.
"""

import argparse
import datetime
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CHECKPOINT_WEIGHTS, load_model  # noqa: E402
from errors import FastgenError  # noqa: E402
from quantize import GROUPSIZES, quantize_checkpoint  # noqa: E402
from scripts.perplexity import botchan_ids, window_logits  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


@torch.no_grad()
def score(model, ids, window, ref_logps=None, kv_cache_dtype=None):
    """(perplexity, mean KL(reference || model) per scored token or None)."""
    nll, kl, count = 0.0, 0.0, 0
    for i, (logits, targets) in enumerate(window_logits(model, ids, window, kv_cache_dtype)):
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        if ref_logps is not None:
            ref = ref_logps[i]
            kl += (ref.exp() * (ref - logp)).sum().item()
        count += targets.numel()
    return math.exp(nll / count), (kl / count if ref_logps is not None else None)


@torch.no_grad()
def reference(model, ids, window):
    """(perplexity, per-window log-probs) of the reference model."""
    logps, nll, count = [], 0.0, 0
    for logits, targets in window_logits(model, ids, window):
        logps.append(torch.log_softmax(logits.float(), dim=-1))
        nll -= logps[-1].gather(-1, targets[:, None]).sum().item()
        count += targets.numel()
    return math.exp(nll / count), logps


def evaluate_all(checkpoint, tokens=4096, window=1024, groupsizes=GROUPSIZES, work_dir=None, log=print):
    """Rows of {"variant", "perplexity", "kl", "file_mb"}; the first row is the fp32 reference."""
    checkpoint = Path(checkpoint)
    ids = botchan_ids(load_tokenizer(checkpoint), tokens)
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="eval_quant-")
        work_dir = tmp.name
    work_dir = Path(work_dir)
    try:

        def file_mb(ckpt):
            return (Path(ckpt) / CHECKPOINT_WEIGHTS).stat().st_size / 1e6

        # (label, checkpoint, compute dtype, kv cache dtype)
        variants = [("bf16 compute", checkpoint, torch.bfloat16, None)]
        out = work_dir / "int8"
        if not out.exists():
            quantize_checkpoint(checkpoint, "int8", output_dir=out)
        variants.append(("int8 weights (per channel)", out, torch.float32, None))
        for g in groupsizes:
            out = work_dir / f"int4-g{g}"
            if not out.exists():
                quantize_checkpoint(checkpoint, "int4", g, output_dir=out)
            variants.append((f"int4 weights, group {g}", out, torch.float32, None))
        variants += [
            ("int8 KV cache", checkpoint, torch.float32, torch.int8),
            ("fp8 (e4m3) KV cache", checkpoint, torch.float32, torch.float8_e4m3fn),
        ]

        t0 = time.time()
        ref_model, _ = load_model(checkpoint, "cpu", torch.float32)
        ref_ppl, ref = reference(ref_model, ids, window)
        rows = [{"variant": "fp32 (reference)", "perplexity": ref_ppl, "kl": None, "file_mb": file_mb(checkpoint)}]
        log(f"  fp32 reference: perplexity {ref_ppl:.4f} ({time.time() - t0:.0f} s)")
        for label, ckpt, dtype, kv in variants:
            t0 = time.time()
            model = ref_model if (ckpt == checkpoint and dtype == torch.float32) else load_model(ckpt, "cpu", dtype)[0]
            ppl, kl = score(model, ids, window, ref, kv)
            rows.append(
                {
                    "variant": label,
                    "perplexity": ppl,
                    "kl": kl,
                    "file_mb": file_mb(ckpt) if ckpt != checkpoint else None,
                }
            )
            log(f"  {label}: perplexity {ppl:.4f}, KL {kl:.5f} ({time.time() - t0:.0f} s)")
        return rows, len(ids)
    finally:
        if tmp is not None:
            tmp.cleanup()


def provenance() -> str:
    """What a table needs to be read later: the commit (marked when the tree has local changes),
    the UTC date, and the CPU kernels torch picked (fp32 sums differ in their last digits between
    AVX2 and AVX-512 kernels, whose reduction orders differ)."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += " + local changes"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return f"commit {commit}, {today}, CPU kernels {torch.backends.cpu.get_cpu_capability()}"


def markdown_table(rows) -> str:
    ref = rows[0]["perplexity"]
    lines = ["| variant | perplexity | vs fp32 | KL (nats/token) | model.safetensors |", "|---|---|---|---|---|"]
    for r in rows:
        rel = "-" if r["kl"] is None else f"{100 * (r['perplexity'] / ref - 1):+.2f}%"
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        mb = "-" if r["file_mb"] is None else f"{r['file_mb']:.0f} MB"
        lines.append(f"| {r['variant']} | {r['perplexity']:.3f} | {rel} | {kl} | {mb} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="an unquantized checkpoint (the reference)")
    p.add_argument("--tokens", type=int, default=4096, help="Botchan tokens to score (default: 4096)")
    p.add_argument(
        "--window",
        type=int,
        default=1024,
        help="tokens per independent window, each from an empty cache (default: 1024)",
    )
    p.add_argument(
        "--groupsizes",
        default=",".join(map(str, GROUPSIZES)),
        help="int4 group sizes to measure, comma-separated (default: all)",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, help="keep the quantized checkpoints here (reused if present)"
    )
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        groupsizes = [int(g) for g in args.groupsizes.split(",") if g]
    except ValueError:
        p.error(f"--groupsizes must be comma-separated integers (got {args.groupsizes!r})")
    try:
        rows, n = evaluate_all(
            args.checkpoint,
            args.tokens,
            args.window,
            groupsizes,
            args.work_dir,
            log=lambda s: print(s, file=sys.stderr),
        )
    except (FastgenError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{args.checkpoint.name}, first {n} Botchan tokens, windows of {args.window}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {provenance()}\n"
    )
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
