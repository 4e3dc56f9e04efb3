"""Benchmark decode and prefill speed on random weights at real model shapes: our engine side by
side with Hugging Face transformers generate() and, given a checkout, gpt-fast.

    python scripts/bench.py --suite quick                       # one H100, under 10 minutes
    python scripts/bench.py --suite peers --gpt-fast-dir peers/gpt-fast   # ours vs HF vs gpt-fast, ~8 min
    python scripts/bench.py --suite full --models llama-3-8b --batch 1   # the grid, one slice at a time
    python scripts/bench.py --device cpu --models smollm2-135m --suite smoke   # CPU smoke test
    python scripts/bench.py --merge bench_out/a.json bench_out/b.json      # one table + plot from slices
    python scripts/bench.py --tp 1,2 --tp-all-reduce nccl,symm-mem   # tensor parallel (scripts/bench_tp.py)

One-shot GPU run, about 8 minutes on one H100 80GB (torch 2.11, transformers 5.17): ours,
transformers and gpt-fast on the Llama-3-8B shape (bf16, batch 1, 16-token prompt, 200 new
tokens), our int8 and int4-g64 rows, gpt-fast int8, and our cold/warm start-up breakdown:

    python scripts/bench.py --suite peers --gpt-fast-dir peers/gpt-fast --out-dir $OUT/bench_out

peers/gpt-fast is git-excluded in the main checkout, so a copy of the work tree must carry it
explicitly (the device runner: carry ["peers/gpt-fast"]); without it the command stops at once
with "error: --gpt-fast-dir ...", exit 2. In order: cold then warm start-up in fresh processes
(~1.5 min; the cold one fills the Inductor cache that our bf16 row then reuses), ours bf16, HF
bf16 (~1.5 min, compiles), gpt-fast bf16 (~1.5 min, compiles in its own process), ours int8,
ours int4-g64 (~1 min each), gpt-fast int8. Nothing new starts once it could not finish within
480 s (--time-budget-s); such a row reads "not run: time budget" and can be measured on its own:

    python scripts/bench.py --suite peers --weights bf16,int4-g64 --no-hf --no-cold-start --out-dir $OUT/bench_out

bench_out/bench_<time>_<suite>.json is rewritten after every row (a killed run keeps its rows);
latest.json, the plot and the markdown table (stdout, last) come at the end.

Weights are N(0, 0.02) (norm weights 1), made on the device from a meta-device model: no file.
Each configuration: prefill a random prompt of `ctx` tokens, then decode --new-tokens; one
warm-up call (it compiles), then --runs timed calls; medians are reported.

What the columns mean
  tok/s    decode tokens/s over all rows: (new_tokens - 1) * batch / decode time
  GB/s     (weight bytes + KV bytes read) per step * steps / decode time. Weight bytes follow
           gpt-fast (embedding table excluded unless tied); KV bytes = valid slots * Hkv * D * 2
           * bytes * layers * batch, averaged over the decode steps (window-capped for Mistral).
           Every implementation's row counts bytes the same way.
  %copy    GB/s as a fraction of a device-to-device copy_ measured in this run (read + write bytes)
  pf tok/s prefill tokens/s (batch * ctx / time to first token); pf %mm = prefill FLOP/s over the
           bf16 8192^3 matmul rate measured in this run
  TTFT     time to first token (prefill + first sample, on the host)
  1st s    the warm-up call's first decode step: compile + the CUDA-graph warm-up run when a new
           shape compiles, "-" when the shape was already compiled (HF rows: the whole first call)
  KV MB    the KV cache as allocated (every slot of every row, values and any scales; an int8 or
           fp8 cache is about 52% of bf16 at head_dim 128); "-" where not known (HF rows)
  HF rows  decode time = median generate(N) - median generate(1) (the static cache keeps one size
           across calls, so both run the same compiled graphs); TTFT = median generate(1). The
           note says how the decode step was compiled (scripts/bench_hf.py).
  gpt-fast rows  measured in a child process from --gpt-fast-dir (scripts/bench_gpt_fast.py);
           the note gives its commit ("unknown" unless DIR is the top of a git checkout).
Start-up: the headline configuration in fresh processes, with an empty TORCHINDUCTOR_CACHE_DIR
(cold), then the same command on that cache dir (warm), phase by phase (scripts/bench_startup.py).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_common import DTYPES, T0, copy_bandwidth, free_memory, is_oom, log, matmul_rate, short_error  # noqa: E402
from bench_gpt_fast import PeerUnavailable, check_gpt_fast_dir, run_gpt_fast  # noqa: E402
from bench_hf import AUTO, FORWARD, run_hf  # noqa: E402
from bench_ours import OursRunner  # noqa: E402
from bench_plan import ALL_MODELS, GPT_FAST, GRID_FLAGS, HF, OURS, SUITES, parse_size, plan_jobs, split, static_skip  # noqa: E402
from bench_report import header, markdown, merge_main, write_outputs  # noqa: E402
from bench_startup import start_times, worker_main  # noqa: E402

from checkpoint import model_args_from_name  # noqa: E402
from generate import KV_CACHE_DTYPES  # noqa: E402

CUDA_COPY_BYTES, CPU_COPY_BYTES = 1 << 30, 64 << 20
CUDA_MATMUL_N, CPU_MATMUL_N = 8192, 512
STARTUP_TIMEOUT_S = 300  # each of the cold and warm processes
CHILD_TIMEOUT_S = 480  # a gpt-fast measurement (its compile included)
CHILD_SLACK_S = 60  # a child may run this far past the time budget before it is killed
SAME_SHAPE_JOB_S = 10  # budget estimate for a job that compiles nothing new


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype of unquantized weights")
    p.add_argument("--models", default=None, help=f"comma list from: {', '.join(ALL_MODELS)}")
    p.add_argument("--weights", default=None, help="comma list: bf16, int8, int4-g64, ...")
    p.add_argument("--kv-dtypes", default=None, help="comma list: bf16, int8, fp8")
    p.add_argument("--batch", default=None, help="comma list of batch sizes")
    p.add_argument("--ctx", default=None, help="comma list of filled context lengths (16,2k,8k)")
    p.add_argument("--cache", default=None, help="comma list of cache slots: just (ctx + new tokens), 32k, 128k")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--compile-prefill",
        action="store_true",
        help="our prefill compiled too (generate.py --compile-prefill, dynamic shapes); default eager",
    )
    p.add_argument("--hf", dest="hf", action="store_true", default=None, help="run the transformers comparison")
    p.add_argument("--no-hf", dest="hf", action="store_false")
    p.add_argument(
        "--hf-compile",
        choices=[AUTO, FORWARD],
        default=AUTO,
        help="auto: transformers' own compile_config path, falling back to forward; forward: our "
        "decode-only wrapper of torch.compile(model.forward) (see scripts/bench_hf.py)",
    )
    p.add_argument(
        "--gpt-fast-dir",
        type=Path,
        default=None,
        help="a pytorch-labs/gpt-fast checkout: run it as a peer on the same shapes",
    )
    p.add_argument(
        "--cold-start",
        dest="cold_start",
        action="store_true",
        default=True,
        help="measure cold and warm start-up of the first configuration in subprocesses (default)",
    )
    p.add_argument("--no-cold-start", dest="cold_start", action="store_false")
    p.add_argument(
        "--beyond-context",
        action="store_true",
        help="allow caches/positions past a model's trained context (random weights: speed is the same)",
    )
    p.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (default 1 GiB on cuda)")
    p.add_argument("--matmul-size", type=int, default=None, help="default 8192 on cuda, 512 on cpu")
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start nothing new after this many seconds (0 = none); quick 560, peers 480, full 570",
    )
    p.add_argument(
        "--tp",
        default=None,
        help="tensor-parallel mode: comma list of world sizes (1,2), each run under torchrun by "
        "scripts/bench_tp.py (default model llama-3-8b, bf16, batch 1; see that file)",
    )
    p.add_argument("--tp-all-reduce", default="nccl", help="with --tp: nccl, symm-mem or nccl,symm-mem")
    p.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="print one table (and plot) from earlier JSON files instead of measuring",
    )
    opts = p.parse_args(argv)
    opts.explicit = {k for k in SUITES[opts.suite] if getattr(opts, k, None) is not None}
    for k, v in SUITES[opts.suite].items():
        if getattr(opts, k, None) is None:
            setattr(opts, k, v)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.gpt_fast_dir is not None:
        opts.gpt_fast_dir = opts.gpt_fast_dir.resolve()  # child processes run in other directories
    opts.gpt_fast_commit = None
    return opts


def usage_error(opts) -> str | None:
    """A one-line problem with the flags, checked before anything is measured."""
    if torch.device(opts.device).type == "cuda" and not torch.cuda.is_available():
        return "--device cuda but CUDA is not available; use --device cpu"
    for m in split(opts.models):
        try:
            model_args_from_name(m)
        except ValueError as e:
            return f"--models: {e}"
    for kv in split(opts.kv_dtypes):
        if kv != "bf16" and kv not in KV_CACHE_DTYPES:
            return f"unknown KV dtype {kv!r}; use one of bf16, {', '.join(KV_CACHE_DTYPES)}"
    if opts.gpt_fast_dir is not None:
        try:
            opts.gpt_fast_commit = check_gpt_fast_dir(opts.gpt_fast_dir)
        except PeerUnavailable as e:
            return str(e)
    return None


def jobs_for(opts):
    return plan_jobs(
        opts.suite,
        bool(opts.explicit & GRID_FLAGS),
        split(opts.models),
        split(opts.weights),
        split(opts.kv_dtypes),
        [int(b) for b in split(opts.batch)],
        [parse_size(c) for c in split(opts.ctx)],
        [parse_size(c) for c in split(opts.cache)],
        beyond_context=opts.beyond_context,
        hf=opts.hf,
        gpt_fast=opts.gpt_fast_dir is not None,
    )


def measure_ceilings(report, opts, device, dtype):
    """The device's practical ceilings: copy bandwidth and a big bf16 matmul."""
    cuda = device.type == "cuda"
    report["copy_bandwidth"] = copy_bandwidth(device, opts.copy_bytes or (CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES))
    report["matmul"] = matmul_rate(device, opts.matmul_size or (CUDA_MATMUL_N if cuda else CPU_MATMUL_N), dtype)
    free_memory(device)
    log(f"copy {report['copy_bandwidth']['GBps']:.0f} GB/s, matmul {report['matmul']['TFLOPs']:.3g} TFLOP/s")


def run_job(impl, cfg, opts, device, dtype, ours: OursRunner, row, remaining_s):
    """One row; the caller turns exceptions into error rows."""
    if impl == OURS:
        return ours.run(cfg, row)
    ours.release()  # peers need the memory
    if impl == HF:
        if cfg.weights != "bf16" or cfg.kv != "bf16":
            return row.update(status="skip", note="HF comparison runs bf16 only")
        return run_hf(cfg, opts, device, dtype, row)
    if impl == GPT_FAST:
        timeout_s = min(CHILD_TIMEOUT_S, remaining_s + CHILD_SLACK_S)
        return run_gpt_fast(cfg, opts, model_args_from_name(cfg.model), row, timeout_s)
    raise ValueError(f"unknown implementation {impl!r}")


def run_jobs(jobs, report, opts, device, dtype, budget, write):
    ours = OursRunner(opts, device, dtype)
    longest_first_call = 0.0  # the budget's estimate of a job that compiles
    for impl, cfg in jobs:
        row = {"impl": impl, "config": asdict(cfg), "status": "pending"}
        report["results"].append(row)
        args = model_args_from_name(cfg.model)
        slots = cfg.cache_slots(opts.new_tokens)
        skip = static_skip(
            cfg,
            args,
            slots,
            opts.new_tokens,
            opts.beyond_context,
            report["header"]["device_memory_bytes"],
            dtype.itemsize,
        )
        compiles = impl != OURS or ours.compiles_for(cfg)
        remaining = budget - (time.perf_counter() - T0)
        if skip is None and (longest_first_call if compiles else SAME_SHAPE_JOB_S) > remaining:
            skip = "not run", f"time budget ({budget:.0f} s)"
        if skip is not None:
            row.update(status=skip[0], note=skip[1])
            continue
        t = time.perf_counter()
        try:
            run_job(impl, cfg, opts, device, dtype, ours, row, remaining)
        except ImportError as e:
            row.update(status="skip", note=f"not available: {short_error(e)}")
            ours.release()
        except Exception as e:  # noqa: BLE001 - one failing configuration must not end the run
            if is_oom(e):
                row.update(status="OOM", note=short_error(e))
            else:
                row.update(status="error", note=short_error(e))
                traceback.print_exc(file=sys.stderr)
            ours.release()
        longest_first_call = max(longest_first_call, row.get("warmup_s") or row.get("first_call_s") or 0)
        speed = f" {row['decode_tok_s']:.1f} tok/s, {row['GBps']:.0f} GB/s" if row["status"] == "ok" else ""
        log(f"{impl} {cfg.label()}: {row['status']}{speed} ({time.perf_counter() - t:.1f} s)")
        write()
    ours.release()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # a start-up measurement process (bench_startup.py), own flags
        return worker_main(argv[1:])
    opts = parse_args(argv)
    if opts.merge:
        return merge_main(opts.merge, opts.out_dir)
    if opts.tp:  # tensor parallel: torchrun workers of scripts/bench_tp.py, one table
        from bench_tp import tp_main

        return tp_main(opts)
    problem = usage_error(opts)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    jobs = jobs_for(opts)
    stem = "bench_" + time.strftime("%Y%m%d-%H%M%S") + f"_{opts.suite}"
    report = {"header": header(device, opts), "results": [], "start_times": [], "notes": []}
    if opts.suite == "peers" and opts.gpt_fast_dir is None:
        report["notes"].append("gpt-fast not run: no --gpt-fast-dir")
    budget = opts.time_budget_s or float("inf")
    write = lambda final=False: write_outputs(report, opts.out_dir, stem, final)  # noqa: E731
    log(
        f"{report['header']['device']}, torch {torch.__version__}, commit {report['header']['git_commit']}; "
        f"{len(jobs)} jobs, budget {budget:.0f} s, int8/fp8 KV decode kernel "
        f"{'on' if report['header']['kv_kernel'] else 'off (FASTGEN_KV_KERNEL=0)'}"
    )
    measure_ceilings(report, opts, device, dtype)
    write()

    # cold / warm start of our headline configuration, before this process compiles anything, so
    # that this process then compiles that shape from the warm cache dir
    head = next((cfg for impl, cfg in jobs if impl == OURS), None)
    cache_dir = None
    if opts.cold_start and head is not None:
        cache_dir = tempfile.mkdtemp(prefix="bench_inductor_")
        remaining = budget - (time.perf_counter() - T0)
        report["start_times"].append(
            start_times(head, opts, head.cache_slots(opts.new_tokens), cache_dir, min(remaining / 2, STARTUP_TIMEOUT_S))
        )
        if opts.compile:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # the gpt-fast child inherits it too
            os.environ.pop("TRITON_CACHE_DIR", None)
        write()

    run_jobs(jobs, report, opts, device, dtype, budget, write)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if device.type == "cpu":
        report["notes"].append("CPU: peak memory is the process's max RSS")
    path = write(final=True)
    log(f"wrote {path} and {opts.out_dir / 'latest.json'}" + (f", {report['plot']}" if "plot" in report else ""))
    print(markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
