"""scripts/bench.py: the CPU smoke suite end to end (JSON fields, table), plus the pieces the GPU
suites rely on that can be checked cheaply here (configs, HF shapes on the meta device)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402


def positive(d, *keys):
    for k in keys:
        assert isinstance(d.get(k), (int, float)) and d[k] > 0, (k, d.get(k))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    cmd = [sys.executable, "scripts/bench.py", "--device", "cpu", "--models", "smollm2-135m", "--suite", "smoke",
           "--weights", "bf16,int8", "--out-dir", str(out)]
    try:
        import transformers  # noqa: F401
        cmd.append("--hf")
    except ImportError:
        pass
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, json.loads((out / "latest.json").read_text()), out


def test_smoke_json(smoke):
    _, report, _ = smoke
    h = report["header"]
    for k in ("device", "torch", "git_commit", "date"):
        assert h[k], k
    assert h["git_commit"] != "unknown"  # the tests run inside the repo
    positive(report["copy_bandwidth"], "GBps", "bytes")
    positive(report["matmul"], "TFLOPs", "n")
    rows = report["results"]
    ours = [r for r in rows if r["impl"] == "ours" and r["config"]["weights"] == "bf16"]
    assert len(ours) == 1 and ours[0]["status"] == "ok", ours
    r = ours[0]
    assert r["config"] == dict(model="smollm2-135m", weights="bf16", kv="bf16", batch=1, ctx=16, cache="just",
                               kernel_profile=True, beyond_context=False)
    positive(r, "decode_tok_s", "step_ms", "GBps", "weights_only_GBps", "prefill_tok_s", "ttft_s", "prefill_TFLOPs",
             "peak_memory_bytes", "weight_bytes", "kv_bytes_per_slot", "kv_read_bytes_per_step", "warmup_s")
    assert r["cache_slots"] == 16 + 8 and len(r["decode_s_runs"]) == 1
    args = ModelArgs.from_name("smollm2-135m")
    assert r["kv_bytes_per_slot"] == args.n_layers * args.n_kv_heads * args.head_dim * 2 * 2
    assert r["GBps"] > r["weights_only_GBps"]
    # a weight mode whose module is missing or fails is a row with a note, never a crash
    q = [r for r in rows if r["config"]["weights"] == "int8"]
    assert len(q) == 1 and q[0]["status"] in ("ok", "skip", "error", "OOM")
    if q[0]["status"] != "ok":
        assert q[0]["note"]
    (start,) = report["start_times"]
    for kind in ("cold", "warm"):
        assert start[kind]["status"] == "ok", start
        positive(start[kind], "process_s", "first_call_s", "ttft_s")
    hf = [r for r in rows if r["impl"] == "hf"]
    if "--hf" in h["argv"]:
        assert len(hf) == 1 and hf[0]["status"] == "ok", hf
        positive(hf[0], "decode_tok_s", "GBps", "ttft_s", "prefill_tok_s", "first_call_s")
        # the same shapes: HF's weights are ours, byte for byte
        assert hf[0]["weight_bytes"] == r["weight_bytes"]
        assert hf[0]["kv_bytes_per_slot"] == r["kv_bytes_per_slot"]


def test_smoke_table_printed_last(smoke):
    p, report, out = smoke
    tail = p.stdout.strip().splitlines()
    table = [ln for ln in tail if ln.startswith("| smollm2-135m")]
    assert table and "| model | w | kv | B | ctx | cache | tok/s |" in p.stdout
    assert p.stdout.rstrip().endswith(bench.markdown(report).rstrip().splitlines()[-1])
    assert len(bench.markdown(report)) < 4000
    assert any(n.startswith("plot skipped") for n in report["notes"]) or (out / Path(report["plot"]).name).is_file()
    assert "[bench" in p.stderr  # progress with timestamps goes to stderr


def test_quick_plan_shapes():
    plan = bench.quick_plan(["llama-3-8b", "smollm2-135m"], ["bf16"], ["bf16"])
    keys = [(c.model, c.batch, c.ctx, c.cache) for c in plan]
    assert keys == [("llama-3-8b", 1, 16, "just"), ("llama-3-8b", 1, 16, 32768), ("llama-3-8b", 1, 8192, 32768),
                    ("smollm2-135m", 1, 16, "just"), ("llama-3-8b", 8, 16, "just")]
    assert plan[3].kernel_profile
    # four decode shapes to compile in the main process: (1, 216), (1, 32768), smollm2, (8, 216)
    assert len({(c.model, c.batch, c.cache_slots(200)) for c in plan}) == 4
    plan = bench.quick_plan(["llama-3-8b"], ["bf16", "int8", "int4-g64"], ["bf16", "int8"])
    assert [(c.weights, c.kv) for c in plan[:4]] == [("bf16", "bf16"), ("int8", "bf16"), ("int4-g64", "bf16"),
                                                      ("bf16", "int8")]
    assert bench.quant_config("int4-g64") == {"mode": "int4", "groupsize": 64}
    assert bench.quant_config("int8") == {"mode": "int8"} and bench.quant_config("bf16") is None


def test_full_grid_and_sizes():
    assert [bench.parse_size(s) for s in ("16", "2k", "8k", "32k", "128k", "just")] == [16, 2048, 8192, 32768,
                                                                                        131072, "just"]
    g = bench.grid(["llama-3-8b"], ["bf16"], ["bf16"], [1, 8], [16, 2048], ["just", 32768], False)
    assert len(g) == 8
    # configurations sharing a decode shape are adjacent, so each shape compiles once
    shapes = [(c.batch, c.cache_slots(200)) for c in g]
    seen = []
    for s in shapes:
        if not seen or seen[-1] != s:
            assert s not in seen
            seen.append(s)


def test_mean_valid_slots():
    assert bench.mean_valid_slots(16, 3, None) == (17 + 18) / 2
    assert bench.mean_valid_slots(8192, 201, 4096) == 4096


def test_build_model_random_on_device():
    model = bench.build_model("smollm2-135m", "bf16", torch.device("cpu"), torch.bfloat16)
    ref = Transformer(ModelArgs.from_name("smollm2-135m"))
    torch.testing.assert_close(model.inv_freq, ref.inv_freq)
    w = model.layers[0].attention.wqkv.weight
    assert w.dtype == torch.bfloat16 and abs(w.float().std().item() - 0.02) < 2e-3
    assert (model.norm.weight == 1).all()
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", bench.ALL_MODELS)
def test_hf_config_matches_shapes(name):
    """The HF side-by-side model has exactly our parameter count (checked on the meta device)."""
    transformers = pytest.importorskip("transformers")
    args = ModelArgs.from_name(name)
    cfg = bench.hf_config(args, torch.bfloat16)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        ours = Transformer(args)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    assert hf.config.sliding_window == args.sliding_window if args.sliding_window else True
