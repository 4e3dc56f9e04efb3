"""generate.py's own decode rate beside the engine's on the same checkpoint and shape (issue 11:
the CLI within 5% of the benchmark, from tiny models up to 8B).

    python scripts/bench_cli.py                      # GPU: SmolLM2-135M with 2 layers, SmolLM2-135M, Llama-3-8B
    python scripts/bench_cli.py --models smollm2-135m:2 --no-compile --new-tokens 8 --device cpu   # quick check

Each model (NAME, or NAME:LAYERS for the named shape with fewer layers) gets a random checkpoint
(scripts/random_checkpoint.py, kept in --workdir for the next run). Then, greedy, batch 1, the same
16-token prompt, new tokens and cache length for both:
  cli     `python generate.py --checkpoint DIR --json F --num-samples S [--compile]` in a fresh
          process: the JSON's decode_tokens_per_s (of the last sample; the first one compiles)
  engine  the same checkpoint loaded in this process, Generator.generate S times: generate.decode_rate
          of the last, as scripts/bench.py measures it
cli / engine below 0.95 is host work the CLI adds to each token (streaming detokenization, stop
strings, printing).
"""

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from checkpoint import load_model  # noqa: E402
from generate import Generator, Sampling, decode_rate  # noqa: E402

PROMPT = " ".join(f"w{i}" for i in range(1, 17))  # 16 ids of the word-level tokenizer


def checkpoint_for(spec: str, workdir: Path, device: str) -> Path:
    """The random checkpoint of NAME or NAME:LAYERS, written once."""
    name, _, layers = spec.partition(":")
    out = workdir / spec.replace(":", "-layers")
    if not (out / "config.json").is_file():
        cmd = [sys.executable, str(ROOT / "scripts" / "random_checkpoint.py"), "--model", name]
        cmd += ["--output", str(out), "--device", device, "--force"] + (["--layers", layers] if layers else [])
        subprocess.run(cmd, check=True, timeout=900)
    return out


def cli_run(checkpoint: Path, opts) -> dict:
    """generate.py in a fresh process; its --json results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cli.json"
        cmd = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(checkpoint), "--prompt", PROMPT]
        cmd += ["--max-new-tokens", str(opts.new_tokens), "--max-seq-length", str(16 + opts.new_tokens)]
        cmd += ["--temperature", "0", "--num-samples", str(opts.samples), "--device", opts.device, "--json", str(out)]
        cmd += ["--compile"] if opts.compile else []
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout_s)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"generate.py exited {p.returncode}: {last}")
        return json.loads(out.read_text())


def engine_rate(checkpoint: Path, prompt_ids: list[int], opts) -> float:
    """The same checkpoint, prompt and shape through Generator in this process."""
    device = torch.device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # generate.py's defaults
    model, _ = load_model(checkpoint, device, dtype)
    gen = Generator(model, compile=opts.compile)
    gen.setup(1, 16 + opts.new_tokens)
    for _ in range(opts.samples):
        res = gen.generate([prompt_ids], opts.new_tokens, Sampling())
    rate, _ = decode_rate(res, 1)
    del model, gen
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", default="smollm2-135m:2,smollm2-135m,llama-3-8b", help="NAME or NAME:LAYERS, comma-separated"
    )
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--samples", type=int, default=3, help="generations per side; the last one is timed")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager steps (CUDA graphs on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fastgen-bench-cli")
    p.add_argument("--timeout-s", type=int, default=600, help="per generate.py process")
    opts = p.parse_args(argv)
    if opts.new_tokens < 3 or opts.samples < 1:
        p.error("--new-tokens must be at least 3 and --samples at least 1")
    rows = []
    for spec in opts.models.split(","):
        checkpoint = checkpoint_for(spec, opts.workdir, opts.device)
        t0 = time.perf_counter()
        cli = cli_run(checkpoint, opts)
        cli_s = time.perf_counter() - t0
        generated = len(cli["rows"][0]["token_ids"])
        engine = engine_rate(checkpoint, cli["rows"][0]["prompt_ids"], opts)
        rows.append((spec, cli["decode_tokens_per_s"], engine, generated, cli_s))
        print(f"{spec}: cli {rows[-1][1]:.1f} tok/s, engine {engine:.1f} tok/s", flush=True)
    where = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"
    print(f"\n{where}, torch {torch.__version__}, compile={opts.compile}, batch 1, 16-token prompt, greedy")
    print("| model | generate.py tok/s | engine tok/s | cli / engine | tokens generated | cli process s |")
    print("|---|---|---|---|---|---|")
    for spec, cli_rate, engine, generated, cli_s in rows:
        ratio = f"{cli_rate / engine:.3f}" if cli_rate and engine else "-"
        print(f"| {spec} | {cli_rate or 0:.1f} | {engine or 0:.1f} | {ratio} | {generated} | {cli_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
