"""The report: header (device, versions, commit), JSON files, the markdown table, the plot, merging."""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from bench_plan import GPT_FAST, HF, fmt_size

import kv_attention
from common import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
IMPL_SUFFIX = {HF: " HF", GPT_FAST: " gpt-fast"}
COMMIT_CHARS = 10
STARTUP_ROWS = [  # (label, field) of the start-up table, in the order the phases happen
    ("imports (process start -> bench code)", "imports_s"),
    ("build random weights", "build_s"),
    ("KV cache setup", "setup_s"),
    ("prefill, eager (-> first token)", "prefill_s"),
    ("compile: decode step 1", "compile_s"),
    ("graph capture: decode step 2", "capture_s"),
    ("replay: decode step 3", "replay_s"),
    ("**process start -> first token**", "to_first_token_s"),
    ("**process start -> full-speed decode**", "to_full_speed_s"),
    ("process start -> exit", "process_s"),
]


def git_commit():
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True, text=True, timeout=10
        )
        if r.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=str(ROOT), timeout=10).returncode
        return r.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def header(device, opts):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        total = None
    return {
        "device": name,
        "device_memory_bytes": total,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "git_commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "argv": sys.argv[1:],
        "suite": opts.suite,
        "new_tokens": opts.new_tokens,
        "runs": opts.runs,
        "compile": opts.compile,
        "dtype": opts.dtype,
        "gpt_fast_dir": str(opts.gpt_fast_dir) if opts.gpt_fast_dir else None,
        "gpt_fast_commit": opts.gpt_fast_commit,
        # int8/fp8 KV rows on CUDA attend through kv_attention's kernel only when this is on
        "kv_kernel": kv_attention.ENABLED,
    }


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def row_note(r) -> str:
    """Status, peer details and the kernel profile, in one cell."""
    ok = r.get("status") == "ok"
    parts = [r["note"]] if ok and r.get("note") else []
    if not ok:
        parts.append(r.get("status", "") + (": " + r["note"] if r.get("note") else ""))
    if r.get("impl") == HF and r.get("hf_compile"):
        parts.append(f"compile: {r['hf_compile']}")
        parts += [f"{path} failed: {error}" for path, error in (r.get("hf_compile_failures") or {}).items()]
    if r.get("impl") == GPT_FAST:
        parts.append(f"gpt-fast commit {(r.get('gpt_fast_commit') or 'unknown')[:COMMIT_CHARS]}")
    kp = r.get("kernel_profile") or {}
    if "kernel_sum_ms_per_step" in kp:
        parts.append(f"kernels {kp['kernel_sum_ms_per_step']:.2f} ms/step of {kp['replay_step_ms']:.2f} ms replay")
    elif kp.get("note"):
        parts.append("kernel profile: " + kp["note"])
    return "; ".join(p for p in parts if p).replace("|", "/")


def result_line(r, copy_bw, mm) -> str:
    c = r["config"]
    ok = r.get("status") == "ok"

    def val(k):
        return r.get(k) if ok else None

    pct = r["GBps"] / copy_bw * 100 if ok and copy_bw else None
    pfmm = r["prefill_TFLOPs"] / mm * 100 if ok and mm else None
    first = val("first_call_s") if r.get("impl") == HF else val("first_step_s")
    cells = [
        c["model"] + IMPL_SUFFIX.get(r.get("impl"), ""),
        c["weights"],
        c["kv"],
        str(c["batch"]),
        fmt_size(c["ctx"]),
        fmt_size(c["cache"]),
        _f(val("decode_tok_s"), ".1f"),
        _f(val("step_ms"), ".2f"),
        _f(val("GBps"), ".0f"),
        _f(pct, ".0f"),
        _f(val("prefill_tok_s"), ".0f"),
        _f(pfmm, ".0f"),
        _f(r["ttft_s"] * 1e3 if ok else None, ".1f"),
        _f(first, ".1f"),
        _f(r["kv_cache_bytes"] / 1e6 if ok and r.get("kv_cache_bytes") else None, ".1f"),
        _f(r["peak_memory_bytes"] / 1e9 if ok else None, ".1f"),
        row_note(r),
    ]
    return "| " + " | ".join(cells) + " |"


def startup_table(s) -> list[str]:
    c = s["config"]
    lines = [
        f"\nstart-up, {c['model']} w={c['weights']} B={c['batch']} ctx={c['ctx']} cache={s['cache_slots']} "
        f"compile={s['compile']}, fresh process each: cold = empty Inductor cache dir, warm = reused",
        "",
        "| phase | cold s | warm s |",
        "|---|---|---|",
    ]
    runs = [s.get(kind) or {} for kind in ("cold", "warm")]
    for label, key in STARTUP_ROWS:
        lines.append(f"| {label} | " + " | ".join(_f(k.get(key), ".2f") for k in runs) + " |")
    for kind, k in zip(("cold", "warm"), runs):
        if k.get("status") not in (None, "ok"):
            lines.append(f"\n{kind} start {k['status']}: {k.get('note', '')}")
    if runs[0].get("status") == "ok" and not runs[0].get("cuda_graphs"):
        lines.append("\n(no CUDA graphs here: decode step 2 is an ordinary step)")
    return lines


def markdown(report) -> str:
    h = report["header"]
    copy_bw = (report.get("copy_bandwidth") or {}).get("GBps")
    mm_info = report.get("matmul") or {}
    mm = mm_info.get("TFLOPs")
    lines = [
        f"### bench: {h['device']} | torch {h['torch']} | commit {h['git_commit']} | {h['date']}",
        f"suite {h['suite']}, {h['new_tokens']} new tokens, median of {h['runs']}, compile={h['compile']}, "
        f"copy BW {_f(copy_bw, '.0f')} GB/s, {mm_info.get('dtype', '')} {mm_info.get('n', '')}^3 matmul "
        f"{_f(mm, '.3g')} TFLOP/s",
        "",
        "| model | w | kv | B | ctx | cache | tok/s | ms/step | GB/s | %copy | pf tok/s | pf %mm | TTFT ms "
        "| 1st s | KV MB | peak GB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [result_line(r, copy_bw, mm) for r in report["results"]]
    for s in report.get("start_times", []):
        lines += startup_table(s)
    lines += [f"\nnote: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def plot(report, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    series = {}
    for r in report["results"]:
        if r.get("status") != "ok":
            continue
        c = r["config"]
        key = (
            f"{c['model']}{IMPL_SUFFIX.get(r.get('impl'), '')} {c['weights']}/kv {c['kv']} "
            f"B={c['batch']} cache={fmt_size(c['cache'])}"
        )
        series.setdefault(key, []).append((c["ctx"], r["decode_tok_s"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("filled context (tokens)")
    ax.set_ylabel("decode tokens/s (all rows)")
    h = report["header"]
    ax.set_title(f"{h['device']} | torch {h['torch']} | {h['git_commit']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(report, out_dir: Path, stem: str, final: bool):
    """The JSON after every row (a killed run keeps what it measured); the plot and latest.json at the end."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    if final:
        note = plot(report, out_dir / f"{stem}.png")
        if note:
            report.setdefault("notes", []).append(note)
        else:
            report["plot"] = str(out_dir / f"{stem}.png")
    write_json_atomic(path, report, indent=1, default=str)
    if final:
        shutil.copyfile(path, out_dir / "latest.json")
    return path


def merge_main(paths: list[Path], out_dir: Path):
    reports = [json.loads(p.read_text()) for p in paths]
    merged = {
        "header": dict(reports[0]["header"], suite="merged: " + ", ".join(p.name for p in paths)),
        "copy_bandwidth": reports[0].get("copy_bandwidth"),
        "matmul": reports[0].get("matmul"),
        "results": [r for rep in reports for r in rep.get("results", [])],
        "start_times": [s for rep in reports for s in rep.get("start_times", [])],
        "notes": list(dict.fromkeys(n for rep in reports for n in rep.get("notes", []))),
    }
    devices = {rep["header"]["device"] for rep in reports}
    if len(devices) > 1:
        merged["notes"].append(f"merged runs from different devices: {sorted(devices)}")
    write_outputs(merged, out_dir, "merged", final=True)
    print(markdown(merged))
    return 0
