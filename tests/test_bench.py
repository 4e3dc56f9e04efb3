"""scripts/bench.py and its modules: the CPU smoke suite end to end (JSON fields, table, start-up
phases, gpt-fast and HF rows), plus the pieces the GPU suites rely on that can be checked cheaply
here (plans, HF and gpt-fast shapes on the meta device, HF compile paths with an eager backend).

The gpt-fast parts need a checkout: $GPT_FAST_DIR, else peers/gpt-fast in this repository (the
lead's untracked copy); they are skipped without one."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import model_args_from_name
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402
import bench_gpt_fast  # noqa: E402
import bench_hf  # noqa: E402
import bench_ours  # noqa: E402
import bench_plan  # noqa: E402
from bench_plan import GPT_FAST, HF, OURS, Config  # noqa: E402

GPT_FAST_DIR = Path(os.environ.get("GPT_FAST_DIR", ROOT / "peers" / "gpt-fast"))
HAVE_GPT_FAST = (GPT_FAST_DIR / "model.py").is_file()
needs_gpt_fast = pytest.mark.skipif(not HAVE_GPT_FAST, reason=f"no gpt-fast checkout at {GPT_FAST_DIR}")
TINY = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=256, max_position_embeddings=128
)


def positive(d, *keys):
    for k in keys:
        assert isinstance(d.get(k), (int, float)) and d[k] > 0, (k, d.get(k))


def run_bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "scripts/bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    # three runs: HF's decode time is a difference of medians, which one run on a busy CPU can invert
    args = [
        "--device",
        "cpu",
        "--models",
        "smollm2-135m",
        "--suite",
        "smoke",
        "--weights",
        "bf16,int8",
        "--runs",
        "3",
        "--out-dir",
        str(out),
    ]
    if importlib.util.find_spec("transformers"):
        args.append("--hf")
    if HAVE_GPT_FAST:  # relative, as in the documented GPU command
        args += ["--gpt-fast-dir", os.path.relpath(GPT_FAST_DIR, ROOT)]
    p = run_bench(*args, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, json.loads((out / "latest.json").read_text()), out


def rows_of(report, impl, weights="bf16"):
    return [r for r in report["results"] if r["impl"] == impl and r["config"]["weights"] == weights]


def test_smoke_json(smoke):
    _, report, _ = smoke
    h = report["header"]
    for k in ("device", "torch", "git_commit", "date"):
        assert h[k], k
    assert h["git_commit"] != "unknown"  # the tests run inside the repo
    positive(report["copy_bandwidth"], "GBps", "bytes")
    positive(report["matmul"], "TFLOPs", "n")
    (r,) = rows_of(report, OURS)
    assert r["status"] == "ok", r
    assert r["config"] == dict(
        model="smollm2-135m",
        weights="bf16",
        kv="bf16",
        batch=1,
        ctx=16,
        cache="just",
        kernel_profile=True,
        beyond_context=False,
    )
    positive(
        r,
        "decode_tok_s",
        "step_ms",
        "GBps",
        "weights_only_GBps",
        "prefill_tok_s",
        "ttft_s",
        "prefill_TFLOPs",
        "peak_memory_bytes",
        "weight_bytes",
        "kv_bytes_per_slot",
        "kv_read_bytes_per_step",
        "warmup_s",
    )
    assert r["cache_slots"] == 16 + 8 and len(r["decode_s_runs"]) == 3
    args = model_args_from_name("smollm2-135m")
    assert r["kv_bytes_per_slot"] == args.n_layers * args.n_kv_heads * args.head_dim * 2 * 2
    assert r["GBps"] > r["weights_only_GBps"]
    # the KV column: the allocated cache, every slot of every row (bf16: no scales)
    assert r["kv_cache_bytes"] == r["config"]["batch"] * r["cache_alloc"] * r["kv_bytes_per_slot"]
    assert "KV MB" in bench.markdown(report)
    # a weight mode whose module is missing or fails is a row with a note, never a crash
    (q,) = rows_of(report, OURS, "int8")
    assert q["status"] in ("ok", "skip", "error", "OOM")
    if q["status"] != "ok":
        assert q["note"]


def test_smoke_startup_phases(smoke):
    _, report, _ = smoke
    (start,) = report["start_times"]
    for kind in ("cold", "warm"):
        s = start[kind]
        assert s["status"] == "ok", start
        positive(
            s,
            "process_s",
            "imports_s",
            "build_s",
            "prefill_s",
            "compile_s",
            "capture_s",
            "replay_s",
            "first_call_s",
            "to_first_token_s",
            "to_full_speed_s",
        )
        # phases happen in order: imports, build, prefill (first token), decode steps 1 and 2, exit
        assert s["imports_s"] + s["build_s"] + s["prefill_s"] <= s["to_first_token_s"] + 0.05
        assert s["to_first_token_s"] + s["compile_s"] + s["capture_s"] <= s["to_full_speed_s"] + 0.05
        assert s["to_full_speed_s"] < s["process_s"]
        assert s["cuda_graphs"] is False


def test_smoke_hf_row(smoke):
    _, report, _ = smoke
    if "--hf" not in report["header"]["argv"]:
        pytest.skip("transformers is not installed")
    (hf,) = rows_of(report, HF)
    assert hf["status"] == "ok", hf
    positive(hf, "decode_tok_s", "GBps", "ttft_s", "prefill_tok_s", "first_call_s")
    assert hf["hf_compile"] == bench_hf.EAGER  # the smoke suite does not compile
    # the same shapes: HF's weights are ours, byte for byte
    (ours,) = rows_of(report, OURS)
    assert hf["weight_bytes"] == ours["weight_bytes"] and hf["kv_bytes_per_slot"] == ours["kv_bytes_per_slot"]


@needs_gpt_fast
def test_smoke_gpt_fast_rows(smoke):
    p, report, _ = smoke
    assert report["header"]["gpt_fast_commit"] == bench_gpt_fast.gpt_fast_commit(GPT_FAST_DIR)
    assert report["header"]["gpt_fast_dir"] == str(GPT_FAST_DIR.resolve())
    (ours,) = rows_of(report, OURS)
    for weights in ("bf16", "int8"):
        (g,) = rows_of(report, GPT_FAST, weights)
        assert g["status"] == "ok", g
        positive(
            g,
            "decode_tok_s",
            "step_ms",
            "GBps",
            "ttft_s",
            "prefill_tok_s",
            "warmup_s",
            "first_step_s",
            "gpt_fast_style_tok_s",
            "weight_bytes",
        )
        assert g["cache_slots"] == 24 and g["cache_alloc"] == 24 and len(g["decode_s_runs"]) == 3
        assert g["kv_bytes_per_slot"] == ours["kv_bytes_per_slot"]  # gpt-fast's bf16 cache, same shape
        assert g["gpt_fast_commit"] == report["header"]["gpt_fast_commit"]
        assert "untied" in g["note"]  # SmolLM2 ties its embedding; gpt-fast cannot
    # same byte convention: gpt-fast's untied output weight is our tied embedding, read once a step
    assert rows_of(report, GPT_FAST)[0]["weight_bytes"] == ours["weight_bytes"]
    assert rows_of(report, GPT_FAST, "int8")[0]["weight_bytes"] < ours["weight_bytes"] / 1.5
    assert "| smollm2-135m gpt-fast | bf16 |" in p.stdout


def test_smoke_table_printed_last(smoke):
    p, report, out = smoke
    assert "| model | w | kv | B | ctx | cache | tok/s |" in p.stdout
    assert "| smollm2-135m | bf16 |" in p.stdout and "| phase | cold s | warm s |" in p.stdout
    assert p.stdout.rstrip().endswith(bench.markdown(report).rstrip().splitlines()[-1])
    assert len(bench.markdown(report)) < 6000
    assert any(n.startswith("plot skipped") for n in report["notes"]) or (out / Path(report["plot"]).name).is_file()
    assert "[bench" in p.stderr  # progress with timestamps goes to stderr


def test_missing_gpt_fast_dir_is_a_one_line_error(tmp_path):
    p = run_bench(
        "--device", "cpu", "--suite", "smoke", "--gpt-fast-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path)
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("error: --gpt-fast-dir") and "not a gpt-fast checkout" in p.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.py").write_text("")
    (broken / "generate.py").write_text("import no_such_module_anywhere\n")
    p = run_bench("--device", "cpu", "--suite", "smoke", "--gpt-fast-dir", str(broken), "--out-dir", str(tmp_path))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "--gpt-fast-dir" in p.stderr and "no_such_module_anywhere" in p.stderr
    assert not list(tmp_path.glob("bench_*.json"))  # nothing was measured


def test_gpt_fast_commit_only_from_its_own_checkout(tmp_path):
    repo = tmp_path / "gpt-fast"
    (repo / "sub").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (repo / "model.py").write_text("")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert bench_gpt_fast.gpt_fast_commit(repo) == head and len(head) == 40
    # a copy inside another repository must not report that repository's commit
    assert bench_gpt_fast.gpt_fast_commit(repo / "sub") == "unknown"
    assert bench_gpt_fast.gpt_fast_commit(tmp_path / "absent") == "unknown"


def load_gpt_fast_model():
    """gpt-fast's model.py under a private name (it imports only torch), to check shapes here."""
    spec = importlib.util.spec_from_file_location("gpt_fast_model_under_test", GPT_FAST_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_gpt_fast
def test_gpt_fast_args_match_its_own_named_configs():
    gf = load_gpt_fast_model()
    for name in ("llama-3-8b", "llama-3.1-8b"):
        ours = bench_gpt_fast.gpt_fast_model_args(model_args_from_name(name), cache_slots=216)
        assert gf.ModelArgs(**ours) == gf.ModelArgs.from_name(name), name


@needs_gpt_fast
@pytest.mark.parametrize("name", bench_plan.ALL_MODELS)
def test_gpt_fast_shapes_match_ours(name):
    """Every shape gpt-fast can run has our parameter count (plus an output matrix where we tie)."""
    args = model_args_from_name(name)
    reason = bench_gpt_fast.unsupported(args, "bf16", 216)
    if reason:
        assert name in ("qwen2.5-7b",), (name, reason)
        return
    gf = load_gpt_fast_model()
    with torch.device("meta"):
        theirs = gf.Transformer(gf.ModelArgs(**bench_gpt_fast.gpt_fast_model_args(args, 216)))
        ours = Transformer(args)
    tied_output = args.vocab_size * args.dim if args.tie_embeddings else 0
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) + tied_output


def test_gpt_fast_unsupported_shapes():
    assert "qkv bias" in bench_gpt_fast.unsupported(model_args_from_name("qwen2.5-7b"), "bf16", 216)
    mistral = model_args_from_name("mistral-7b-v0.1")
    assert bench_gpt_fast.unsupported(mistral, "bf16", 216) is None  # the window never binds at 216 slots
    assert "sliding window" in bench_gpt_fast.unsupported(mistral, "bf16", 8192 + 200)
    llama = model_args_from_name("llama-3-8b")
    assert "int8" in bench_gpt_fast.unsupported(llama, "int4-g64", 216)
    assert "KV cache" in bench_gpt_fast.unsupported(llama, "bf16", 216, kv="int8")


def test_peers_plan_order():
    jobs = bench_plan.plan_jobs(
        "peers",
        False,
        ["llama-3-8b"],
        ["bf16", "int8", "int4-g64"],
        ["bf16"],
        [1],
        [16],
        ["just"],
        hf=True,
        gpt_fast=True,
    )
    assert [(impl, c.weights) for impl, c in jobs] == [
        (OURS, "bf16"),
        (HF, "bf16"),
        (GPT_FAST, "bf16"),
        (OURS, "int8"),
        (OURS, "int4-g64"),
        (GPT_FAST, "int8"),
    ]
    assert all((c.model, c.batch, c.ctx, c.cache) == ("llama-3-8b", 1, 16, "just") for _, c in jobs)
    quick = bench_plan.plan_jobs(
        "quick", False, ["llama-3-8b", "smollm2-135m"], ["bf16"], ["bf16"], [1], [16], ["just"], hf=True, gpt_fast=False
    )
    assert [impl for impl, _ in quick[:3]] == [OURS, HF, OURS]
    # a grid: peers after all our rows, at every filled context of the first batch size
    g = bench_plan.plan_jobs(
        "full", True, ["llama-3-8b"], ["bf16", "int8"], ["bf16"], [1, 8], [16, 2048], ["just"], hf=True, gpt_fast=True
    )
    peers = [(impl, c.weights, c.batch, c.ctx) for impl, c in g if impl != OURS]
    assert [impl for impl, *_ in g[:8]] == [OURS] * 8
    assert peers == [
        (HF, "bf16", 1, 16),
        (HF, "bf16", 1, 2048),
        (GPT_FAST, "bf16", 1, 16),
        (GPT_FAST, "bf16", 1, 2048),
        (GPT_FAST, "int8", 1, 16),
        (GPT_FAST, "int8", 1, 2048),
    ]


def test_quick_plan_shapes():
    plan = bench_plan.quick_plan(["llama-3-8b", "smollm2-135m"], ["bf16"], ["bf16"])
    keys = [(c.model, c.batch, c.ctx, c.cache) for c in plan]
    assert keys == [
        ("llama-3-8b", 1, 16, "just"),
        ("llama-3-8b", 1, 16, 32768),
        ("llama-3-8b", 1, 8192, 32768),
        ("smollm2-135m", 1, 16, "just"),
        ("llama-3-8b", 8, 16, "just"),
    ]
    assert plan[3].kernel_profile
    # four decode shapes to compile in the main process: (1, 216), (1, 32768), smollm2, (8, 216)
    assert len({(c.model, c.batch, c.cache_slots(200)) for c in plan}) == 4
    plan = bench_plan.quick_plan(["llama-3-8b"], ["bf16", "int8", "int4-g64"], ["bf16", "int8"])
    assert [(c.weights, c.kv) for c in plan[:4]] == [
        ("bf16", "bf16"),
        ("int8", "bf16"),
        ("int4-g64", "bf16"),
        ("bf16", "int8"),
    ]
    assert bench_ours.quant_config("int4-g64") == {"mode": "int4", "groupsize": 64}
    assert bench_ours.quant_config("int8") == {"mode": "int8"} and bench_ours.quant_config("bf16") is None


def test_full_grid_and_sizes():
    assert [bench_plan.parse_size(s) for s in ("16", "2k", "8k", "32k", "128k", "just")] == [
        16,
        2048,
        8192,
        32768,
        131072,
        "just",
    ]
    g = bench_plan.grid(["llama-3-8b"], ["bf16"], ["bf16"], [1, 8], [16, 2048], ["just", 32768], False)
    assert len(g) == 8
    # configurations sharing a decode shape are adjacent, so each shape compiles once
    shapes = [(c.batch, c.cache_slots(200)) for c in g]
    seen = []
    for s in shapes:
        if not seen or seen[-1] != s:
            assert s not in seen
            seen.append(s)


def test_static_skips():
    args = model_args_from_name("llama-3-8b")
    cfg = Config("llama-3-8b", cache=32768)
    assert bench_plan.static_skip(cfg, args, 32768, 200, False, None, 2) == ("skip", "> context 8192")
    assert bench_plan.static_skip(cfg, args, 32768, 200, True, None, 2) is None
    assert bench_plan.static_skip(Config("llama-3-8b", ctx=300, cache=256), args, 256, 200, False, None, 2)[0] == "skip"
    assert bench_plan.static_skip(Config("llama-3-8b"), args, 216, 200, False, 16e9, 2)[0] == "OOM"  # 16 GB of bf16
    assert bench_plan.static_skip(Config("llama-3-8b", weights="int8"), args, 216, 200, False, 16e9, 2) is None


def test_mean_valid_slots():
    from bench_common import mean_valid_slots

    assert mean_valid_slots(16, 3, None) == (17 + 18) / 2
    assert mean_valid_slots(8192, 201, 4096) == 4096


def test_build_model_random_on_device():
    model = bench_ours.build_model("smollm2-135m", "bf16", torch.device("cpu"), torch.bfloat16)
    ref = Transformer(model_args_from_name("smollm2-135m"))
    torch.testing.assert_close(model.inv_freq, ref.inv_freq)
    w = model.layers[0].attention.wqkv.weight
    assert w.dtype == torch.bfloat16 and abs(w.float().std().item() - 0.02) < 2e-3
    assert (model.norm.weight == 1).all()
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", bench_plan.ALL_MODELS)
def test_hf_config_matches_shapes(name):
    """The HF side-by-side model has exactly our parameter count (checked on the meta device)."""
    transformers = pytest.importorskip("transformers")
    args = model_args_from_name(name)
    cfg = bench_hf.hf_config(args)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        ours = Transformer(args)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    assert hf.config.sliding_window == args.sliding_window if args.sliding_window else True


@pytest.mark.parametrize("path", [bench_hf.AUTO, bench_hf.FORWARD])
def test_hf_compile_paths_compile_decode_only(path):
    """Both HF compile paths compile one graph, for the one-token decode step only: prefill stays
    eager, so the static cache is never allocated inside a CUDA graph. An eager backend stands in
    for Inductor (no CUDA graphs on the CPU); the tokens equal uncompiled generate()."""
    pytest.importorskip("transformers")
    cpu = torch.device("cpu")
    hf = bench_hf.build_hf(TINY, cpu, torch.float32)
    ids = torch.randint(3, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def generate(n):
        with torch.no_grad():
            return hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )

    expected = generate(6)
    graphs = []

    def counting_backend(gm, example_inputs, **_):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    bench_hf.configure_compile(hf, path, cpu, dict(backend=counting_backend, fullgraph=True))
    first, one, again = generate(6), generate(1), generate(6)
    bench_hf.check_compiled(hf, path)
    assert torch.equal(first, expected) and torch.equal(again, expected) and torch.equal(one, expected[:, :17])
    assert len(graphs) == 1 and (1, 16) not in graphs[0], graphs
    torch._dynamo.reset()


def test_hf_auto_compile_that_did_not_happen_is_an_error():
    """transformers silently runs eager when its auto-compile criteria fail (here: a CPU without
    the compile-all-devices flag); the bench must not report that as a compiled row."""
    pytest.importorskip("transformers")
    cpu = torch.device("cpu")
    hf = bench_hf.build_hf(TINY, cpu, torch.float32)
    bench_hf.configure_compile(hf, bench_hf.AUTO, cpu, dict(backend="eager"))
    hf.generation_config.compile_config._compile_all_devices = None
    ids = torch.randint(3, TINY.vocab_size, (1, 8))
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    with pytest.raises(RuntimeError, match="did not auto-compile"):
        bench_hf.check_compiled(hf, bench_hf.AUTO)


def test_hf_falls_back_to_forward_path(monkeypatch):
    """A failing auto path is recorded in the row and the forward path measures instead."""
    tried = []

    def fake_measure(cfg, opts, device, dtype, row, path):
        tried.append(path)
        if path == bench_hf.AUTO:
            raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
        row.update(status="ok", hf_compile=path)

    monkeypatch.setattr(bench_hf, "measure_hf", fake_measure)
    opts = bench.parse_args(["--device", "cpu", "--suite", "smoke", "--compile"])
    row = {}
    bench_hf.run_hf(Config("smollm2-135m"), opts, torch.device("cpu"), torch.float32, row)
    assert tried == [bench_hf.AUTO, bench_hf.FORWARD] and row["hf_compile"] == bench_hf.FORWARD
    assert "overwritten" in row["hf_compile_failures"][bench_hf.AUTO]
    assert bench_hf.compile_paths(bench.parse_args(["--suite", "smoke", "--no-compile"])) == [bench_hf.EAGER]


def test_profile_decode_cpu_table(capsys):
    """scripts/profile_decode.py on the CPU: the eager step's operators by self time, mm first."""
    import profile_decode

    argv = ["--device", "cpu", "--model", "smollm2-135m", "--no-compile", "--new-tokens", "3", "--steps", "1"]
    # one thread: on a busy CPU (a run beside another job) the attention's OpenMP threads waited on each other and
    # its self time came out on top (44-47%) in one run of three
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert profile_decode.main(argv + ["--top", "5", "--layers", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| us/step")]
    assert len(rows) == 5, out
    us_per_step = [float(r.split("|")[1]) for r in rows]
    assert us_per_step == sorted(us_per_step, reverse=True) and us_per_step[0] > 0
    assert "aten::mm" in rows[0], out  # a decode step is matrix-vector products, above all else
    assert "smollm2-135m layers=4 " in out and "ms" in out  # --layers: the named shape, fewer layers
    loop_ms = float(out.split("generate()'s loop without its token reads: ")[1].split(" ms")[0])
    assert loop_ms > 0  # the advancing loop ran (its steps on the CPU take milliseconds)
    gap_ms = float(out.split("the median gap between arrivals ")[1].split(" ms")[0])
    assert gap_ms > 0  # the timed generate() saw its decoded tokens arrive one step apart
    spread = out.split("the gaps between arrivals (ms): ")[1].splitlines()[0]
    p10, p90 = (float(spread.split(f"{q} ")[1].split(",")[0]) for q in ("p10", "p90"))
    assert 0 < p10 <= gap_ms <= p90, out  # the spread of the same gaps, around their median


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_profile_decode_times_the_loop_with_parts_of_the_reads(capsys):
    """profile_decode on CUDA (the compiled step, 2 layers): the replayed step, the loop without reads, the loop
    with each part of generate()'s reads, and the timed generate()'s steady step, every one a positive time."""
    import profile_decode

    argv = ["--model", "smollm2-135m", "--layers", "2", "--new-tokens", "12", "--steps", "2", "--top", "3"]
    assert profile_decode.main(argv) == 0
    out = capsys.readouterr().out
    forms = out.split("the loop with a part of the reads (ms a step): ")[1].splitlines()[0]
    times = dict(part.rsplit(" ", 1) for part in forms.split(", "))
    assert set(times) == {"copies", "event waits", "both"} and all(float(ms) > 0 for ms in times.values()), out
    assert float(out.split("the median gap between arrivals ")[1].split(" ms")[0]) > 0, out
    torch._dynamo.reset()


def test_profile_decode_tile_replaces_one_shapes_launch(monkeypatch):
    """profile_decode.py --tile: the named float weight shape launches the given tile in the step, every
    other shape (and an int8 weight of that shape) keeps gemv.decode_gemv_tiles'; a bad spec is a one-line
    argparse error."""
    import profile_decode

    import gemv

    default = gemv.decode_gemv_tiles
    monkeypatch.setattr(gemv, "decode_gemv_tiles", default)  # put back after the test
    spec = profile_decode.parse_tile("1536,2048,glu=4/512/8")
    assert spec == ((1536, 2048, True), dict(BLOCK_N=4, BLOCK_K=512, num_warps=8))
    profile_decode.use_tiles(dict([spec]))
    got = gemv.decode_gemv_tiles(1536, 2048, False, True)
    assert {k: got[k] for k in spec[1]} == spec[1] and got != default(1536, 2048, False, True)
    for other in [(1536, 2048, True, True), (1536, 2048, False, False), (576, 1536, False, False)]:
        assert gemv.decode_gemv_tiles(*other) == default(*other)  # int8, not glu, another shape: their own
    with pytest.raises(SystemExit) as exit_info:
        profile_decode.main(["--tile", "1536,2048,gate=4/512/8"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("flag", [False, True])
def test_compile_prefill_flag_reaches_the_generator(flag):
    """bench.py --compile-prefill measures our prefill compiled (issue 11's 2k-prompt row), as
    generate.py --compile-prefill runs it; without the flag prefill stays eager."""
    import generate

    argv = ["--device", "cpu", "--suite", "smoke", "--no-compile"] + (["--compile-prefill"] if flag else [])
    runner = bench_ours.OursRunner(bench.parse_args(argv), torch.device("cpu"), torch.float32)
    assert runner._prepare(Config("smollm2-135m"), slots=32)
    assert (runner.gen.prefill_fn is not generate.prefill) == flag
    assert runner.gen.decode_fn is generate.decode_next  # decode untouched either way


def test_bench_cli_table(tmp_path, capsys):
    """scripts/bench_cli.py on the CPU: a random 2-layer checkpoint, generate.py's --json rate and the
    engine's on the same prompt, one table row with their ratio."""
    import bench_cli

    argv = ["--models", "smollm2-135m:2", "--no-compile", "--new-tokens", "6", "--samples", "2"]
    assert bench_cli.main(argv + ["--device", "cpu", "--workdir", str(tmp_path)]) == 0
    assert (tmp_path / "smollm2-135m-layers2" / "config.json").is_file()
    assert json.loads((tmp_path / "smollm2-135m-layers2" / "config.json").read_text())["model_args"]["n_layers"] == 2
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smollm2-135m:2 |")]
    assert len(row) == 1
    cli_rate, engine, ratio, generated = (float(c) for c in row[0].split("|")[2:6])
    # the rates print to 0.1 tok/s, the ratio from the unrounded rates: a slow CPU's 20-30 tok/s moves it by ~5e-3
    rounding = cli_rate / engine * (0.05 / cli_rate + 0.05 / engine) + 5e-4
    assert cli_rate > 0 and engine > 0 and ratio == pytest.approx(cli_rate / engine, abs=rounding) and generated == 6


def test_int4_rows_sweep_cpu_table(capsys):
    """scripts/int4_rows_sweep.py on the CPU: every format through the module the model runs, one row
    per row count with a time and a rate in each cell; an unknown shape is exit 2."""
    import int4_rows_sweep

    argv = ["--device", "cpu", "--shapes", "wo", "--rows", "1,2", "--copies", "1", "--iters", "1"]
    assert int4_rows_sweep.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| wo |")]
    assert [r.split("|")[3].strip() for r in rows] == ["1", "2"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[4:-1]]
        assert len(cells) == len(int4_rows_sweep.FORMATS)
        assert all(float(c.split(" ")[0]) > 0 and c.endswith(")") for c in cells), r
    assert int4_rows_sweep.main(["--device", "cpu", "--formats", "int3"]) == 2


def test_small_gemv_sweep_cpu_table(capsys):
    """scripts/small_gemv_sweep.py on the CPU: cuBLAS's column (F.linear here) timed, the GPU-only
    columns a dash, the torch.compile columns skipped on request; an unknown shape is exit 2."""
    import small_gemv_sweep

    argv = ["--device", "cpu", "--shapes", "smol-wo", "--copies", "2", "--iters", "1", "--no-compile"]
    assert small_gemv_sweep.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smol-wo |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[3:-1]]
    assert cells[0] == "2" and float(cells[1].split(" ")[0]) > 0 and cells[2:] == ["-"] * 4
    assert small_gemv_sweep.main(["--device", "cpu", "--shapes", "smol-x"]) == 2


def test_gpu_pending_modes_are_listed_dispatched_and_parse():
    """scripts/gpu_pending.sh (the batched GPU runs NOTES.md queues): every mode its header documents has a case,
    every case is documented and named in its unknown-mode message, and bash parses it, so a mode removed or
    added in one place only (the 2026-12-06 removals touched three) fails here, not on a GPU machine's clock."""
    import re

    script = (ROOT / "scripts" / "gpu_pending.sh").read_text()
    documented = set(re.findall(r"^#   bash scripts/gpu_pending.sh (\S+)", script, re.M))
    cases = set(re.findall(r"^([a-z0-9-]+)\)$", script, re.M))
    usage = re.search(r'unknown mode \$mode: use ([^"]*?) or ([\w-]+)"', script)
    named = {m.strip() for m in usage.group(1).split(",")} | {usage.group(2)}
    assert documented == cases == named, (documented ^ cases, cases ^ named)
    assert {"tests-parallel", "fp8kv", "issue11", "kvbench"} <= cases
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_pending.sh")]).returncode == 0
