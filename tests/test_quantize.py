"""Weight and KV-cache quantization: kernels against references, accuracy pinned on the real
SmolLM2 and Botchan, the quantize CLI round trip, and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantize
from checkpoint import load_model, save_checkpoint
from generate import Generator, Sampling, kv_cache_bytes
from model import ModelArgs, Transformer
from quantize import (
    Int4Linear,
    QuantizationError,
    QuantizedKVCache,
    dequantize_int4,
    quantize_checkpoint,
    quantize_int4,
    quantize_int8,
)

REPO = Path(__file__).resolve().parent.parent
PASSAGE_TOKENS = 1024  # the tests score a shorter passage than BENCHMARKS.md's 4096 tokens


@pytest.mark.parametrize(
    "n,k,groupsize", [(256, 512, 32), (256, 512, 64), (256, 512, 128), (96, 512, 256), (960, 576, 128), (64, 576, 256)]
)  # 576: padded to 640 / 768
def test_int4_matmul_equals_dequantize_then_matmul(n, k, groupsize):
    torch.manual_seed(groupsize + k)
    weight = torch.randn(n, k)
    packed, scales_and_zeros = quantize_int4(weight, groupsize)
    k_pad = -(-k // groupsize) * groupsize
    assert packed.shape == (n, k_pad // 2) and packed.dtype == torch.uint8
    assert scales_and_zeros.shape == (k_pad // groupsize, n, 2) and scales_and_zeros.dtype == torch.bfloat16
    with torch.device("meta"):  # the way checkpoint.load_model builds it: meta, then assign
        linear = Int4Linear(k, n, groupsize=groupsize)
    # the loader hands floats over in the compute dtype: fp32 here
    linear.load_state_dict({"weight": packed, "scales_and_zeros": scales_and_zeros.float()}, assign=True)
    assert linear.is_packed and linear.scales_and_zeros.dtype == torch.bfloat16
    w_deq = dequantize_int4(packed, scales_and_zeros, groupsize)[:, :k]
    for x in (torch.randn(7, k), torch.randn(2, 1, k, dtype=torch.bfloat16)):
        # the kernel takes bf16 activations and returns bf16: the reference rounds the input alike
        ref = x.to(torch.bfloat16).float() @ w_deq.t()
        out = linear(x)
        assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], n)
        assert ((out.float() - ref).norm() / ref.norm()) < 4e-3
    # and the dequantized weight is the original up to rounding: half a step of each group's grid
    pad = torch.cat([weight, weight[:, -1:].expand(n, k_pad - k)], 1).view(n, -1, groupsize)
    step = (pad.amax(-1) - pad.amin(-1)) / 15
    err = w_deq - weight
    err = torch.cat([err, torch.zeros(n, k_pad - k)], 1).view(n, -1, groupsize).abs()
    assert (err <= step[..., None] * 0.51 + 1e-6).all()


def test_int8_round_trip():
    w = torch.randn(64, 96)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_cache_is_half_the_memory_and_close(storage):
    B, H, S, D = 2, 3, 256, 64
    cache = QuantizedKVCache(B, H, S, D, storage, compute_dtype=torch.bfloat16)
    plain_bytes = 2 * B * H * S * D * 2  # a bf16 K and V
    quant_bytes = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert quant_bytes <= 0.55 * plain_bytes
    k, v = torch.randn(B, H, 5, D, dtype=torch.bfloat16), torch.randn(B, H, 5, D, dtype=torch.bfloat16)
    pos = torch.arange(100, 105)
    cache.update(pos, k, v)
    k_all, v_all = cache.read()
    tol = 0.01 if storage == torch.int8 else 0.07  # e4m3 keeps 3 mantissa bits
    for got, want in ((k_all[:, :, 100:105], k), (v_all[:, :, 100:105], v)):
        assert ((got.float() - want.float()).norm() / want.float().norm()) < tol
    assert (k_all[:, :, :100] == 0).all()  # written in place, nowhere else


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_cache_update_compiles(storage):
    """Under torch.compile(fullgraph) (what the CUDA-graph decode step runs) update() writes the
    same slots in place: equal to eager up to one quantization step (Inductor may divide as a
    multiply by the reciprocal), nothing rebound, nothing else touched."""
    torch.manual_seed(1)
    eager = QuantizedKVCache(1, 2, 16, 64, storage, compute_dtype=torch.bfloat16)
    compiled = QuantizedKVCache(1, 2, 16, 64, storage, compute_dtype=torch.bfloat16)
    buffers = [compiled.k_cache.data_ptr(), compiled.k_scale.data_ptr()]
    step = torch.compile(lambda pos, k, v: (compiled.update(pos, k, v), compiled.read())[1], fullgraph=True)
    for slot in (3, 9):
        pos = torch.tensor([slot])
        k, v = torch.randn(2, 1, 2, 1, 64, dtype=torch.bfloat16)
        eager.update(pos, k, v)
        want, got = eager.read(), step(pos, k, v)
        for w, g, x in zip(want, got, (k, v)):
            amax = x.float().abs().amax()
            step_size = amax / (127 if storage == torch.int8 else 14)  # e4m3: 32 apart near 448; + bf16 rounding
            assert ((w.float() - g.float()).abs() <= step_size + amax * 2**-7).all()
        written = torch.zeros(16, dtype=torch.bool)
        written[[3, 9][: [3, 9].index(slot) + 1]] = True
        assert (compiled.k_cache[:, :, ~written].view(torch.uint8) == 0).all()
        assert (compiled.k_scale[:, :, written] > 0).all()
    assert [compiled.k_cache.data_ptr(), compiled.k_scale.data_ptr()] == buffers


def test_quantized_kv_cache_generation_matches_plain():
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=97)
    ).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 1.0)
    gen = Generator(model)
    prompts = [[5, 17, 3, 88, 41], [60, 1]]
    gen.setup(2, 64)
    plain = gen.generate(prompts, 12, Sampling()).tokens
    slots = 2 * 2 * 2 * 2 * model.cache_len  # layers x (K, V) x rows x kv heads x slots; head_dim 16, fp32
    assert kv_cache_bytes(model) == slots * 16 * 4
    gen.setup(2, 64, torch.int8)
    assert isinstance(model.layers[0].attention.kv_cache, QuantizedKVCache)
    assert kv_cache_bytes(model) == slots * (16 * 1 + 4)  # int8 values and one fp32 scale per slot
    assert gen.generate(prompts, 12, Sampling()).tokens == plain


@pytest.mark.parametrize("window", [None, 6])
def test_quantized_cache_decode_attention_plumbing(monkeypatch, window):
    """The decode path that CUDA takes for an int8 cache (the cache's own attention, given each
    row's start and the query's slot), run here with kv_attention's reference standing in for its
    kernel: a batch of different-length prompts decodes to the tokens of the dequantized path."""
    import kv_attention

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=97)
    model = Transformer(ModelArgs(**{**args.__dict__, "sliding_window": window})).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 1.0)
    gen = Generator(model)
    prompts = [[5, 17, 3, 88, 41, 9, 2, 30, 11], [60, 1]]
    gen.setup(2, 64, torch.int8)
    dequantized = gen.generate(prompts, 12, Sampling()).tokens
    calls = torch.zeros((), dtype=torch.long)  # a tensor, so the compiled step can count too

    def reference(q, k_cache, k_scale, v_cache, v_scale, row_start, q_slot, sliding_window):
        assert q.shape[2] == 1  # decode steps only
        calls.add_(1)
        return kv_attention.quantized_decode_attention_reference(
            q, k_cache, k_scale, v_cache, v_scale, row_start, q_slot, sliding_window or None
        )

    monkeypatch.setattr(kv_attention, "available", lambda t: True)
    monkeypatch.setattr(kv_attention, "quantized_decode_attention", reference, raising=False)
    assert gen.generate(prompts, 12, Sampling()).tokens == dequantized
    assert calls == 11 * args.n_layers
    if window is None:  # the compiled decode step takes the same path (dynamo traces the choice)
        torch._dynamo.reset()
        calls.zero_()
        compiled = Generator(model, compile=True)
        compiled.setup(2, 64, torch.int8)
        assert compiled.generate(prompts, 12, Sampling()).tokens == dequantized
        assert calls == 11 * args.n_layers
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def quantized(smollm2_checkpoint, tmp_path_factory):
    """The real SmolLM2 through the quantize CLI (in process: one torch import less)."""
    out = tmp_path_factory.mktemp("quant")
    assert (
        quantize.main(["--checkpoint", str(smollm2_checkpoint), "--mode", "int8", "--output-dir", str(out / "int8")])
        == 0
    )
    assert (
        quantize.main(
            [
                "--checkpoint",
                str(smollm2_checkpoint),
                "--mode",
                "int4",
                "--groupsize",
                "32",
                "--output-dir",
                str(out / "int4-g32"),
            ]
        )
        == 0
    )
    return {"int8": out / "int8", "int4-g32": out / "int4-g32"}


@pytest.fixture(scope="module")
def passage(smollm2_checkpoint):
    from scripts.perplexity import botchan_ids
    from tokenizer import load_tokenizer

    return botchan_ids(load_tokenizer(smollm2_checkpoint), PASSAGE_TOKENS)


@pytest.fixture(scope="module")
def reference_perplexity(smollm2_checkpoint, passage):
    from scripts.perplexity import evaluate

    return evaluate(smollm2_checkpoint, passage)["perplexity"]


@pytest.mark.parametrize("variant,limit", [("int8", 0.01), ("int4-g32", 0.10), ("kv-int8", 0.01)])
def test_perplexity_cost_is_pinned(smollm2_checkpoint, quantized, passage, reference_perplexity, variant, limit):
    from scripts.perplexity import evaluate

    if variant == "kv-int8":
        r = evaluate(smollm2_checkpoint, passage, kv_cache_dtype=torch.int8)
    else:
        r = evaluate(quantized[variant], passage)
    assert abs(r["perplexity"] / reference_perplexity - 1) < limit, (r, reference_perplexity)


def test_config_records_mode_and_generate_loads_it(quantized, tmp_path):
    import generate

    for name, mode, kv in (("int8", {"mode": "int8"}, "fp32"), ("int4-g32", {"mode": "int4", "groupsize": 32}, "int8")):
        config = json.loads((quantized[name] / "config.json").read_text())
        assert config["quantization"] == mode
        assert (quantized[name] / "tokenizer.json").is_file()
        out_json = tmp_path / f"{name}.json"
        # generate.py's CLI, in process; the mode comes from config.json, not the directory name
        assert (
            generate.main(
                [
                    "--checkpoint",
                    str(quantized[name]),
                    "--device",
                    "cpu",
                    "--chat-template",
                    "--prompt",
                    "What is the capital of France?",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "8",
                    "--kv-cache-dtype",
                    kv,
                    "--json",
                    str(out_json),
                ]
            )
            == 0
        )
        assert "Paris" in json.loads(out_json.read_text())["rows"][0]["completion"]
    model, _ = load_model(quantized["int8"], "cpu", torch.float32)
    assert isinstance(model.layers[0].feed_forward.w13, quantize.Int8Linear)
    assert model.layers[0].feed_forward.w13.weight.dtype == torch.int8
    model, _ = load_model(quantized["int4-g32"], "cpu", torch.bfloat16)
    w13 = model.layers[0].feed_forward.w13
    assert isinstance(w13, Int4Linear) and w13.is_packed and w13.scales_and_zeros.dtype == torch.bfloat16
    assert model.output is None  # tied: the logits use the float embedding


@pytest.mark.parametrize(
    "mode", [{"mode": "int8"}, {"mode": "int4", "groupsize": 64}, {"mode": "int4", "groupsize": 256}]
)
def test_untied_model_with_biases_quantizes_every_linear(tmp_path, mode):
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=192, vocab_size=96, qkv_bias=True)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.layers[0].attention.wqkv.bias.normal_()
    config = {"model_args": {f: getattr(args, f) for f in args.__dataclass_fields__}, "quantization": None}
    save_checkpoint(tmp_path / "float", config, dict(model.state_dict()))
    out = quantize_checkpoint(tmp_path / "float", mode["mode"], mode.get("groupsize"), output_dir=tmp_path / "q")
    qmodel, qconfig = load_model(out, "cpu", torch.float32)
    assert qconfig["quantization"] == mode
    cls = quantize.Int8Linear if mode["mode"] == "int8" else Int4Linear
    names = [n for n, m in qmodel.named_modules() if isinstance(m, cls)]
    assert len(names) == 4 * args.n_layers + 1 and "output" in names  # the untied output projection too
    assert torch.equal(qmodel.layers[0].attention.wqkv.bias, model.layers[0].attention.wqkv.bias)  # float
    ids = torch.randint(0, 96, (1, 16))
    for m in (model, qmodel):
        m.setup_caches(1, 16)
        m.set_row_starts(torch.zeros(1, dtype=torch.int32))
    with torch.no_grad():
        ref, got = model(ids, torch.arange(16)), qmodel(ids, torch.arange(16))
    assert ((got - ref).norm() / ref.norm()) < (0.02 if mode["mode"] == "int8" else 0.2)


def test_cli_errors_are_one_line_and_leave_nothing(smollm2_checkpoint, quantized, tmp_path, capsys):
    cases = [
        ((quantized["int8"], "--mode", "int4", "--output-dir", tmp_path / "a"), "already quantized"),
        (
            (smollm2_checkpoint, "--mode", "int4", "--groupsize", 48, "--output-dir", tmp_path / "b"),
            "groupsize must be one of (32, 64, 128, 256)",
        ),
        ((smollm2_checkpoint, "--mode", "int8", "--output-dir", quantized["int8"]), "already exists"),
        ((tmp_path / "missing", "--mode", "int8", "--output-dir", tmp_path / "c"), "does not exist"),
        (
            (smollm2_checkpoint, "--mode", "int8", "--groupsize", 32, "--output-dir", tmp_path / "d"),
            "only applies to --mode int4",
        ),
    ]
    for argv, message in cases:
        assert quantize.main(["--checkpoint", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp dirs
    # the real CLI: exit status 2 and one line on stderr
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "quantize.py"),
            "--checkpoint",
            str(quantized["int8"]),
            "--mode",
            "int8",
            "--output-dir",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "already quantized" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_fp8_kv_cache_without_support_is_a_clear_error(monkeypatch):
    quantize.check_fp8_supported("cpu")  # torch's CPU casts to float8_e4m3fn work here
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(QuantizationError, match="has no float8_e4m3fn; use an int8 KV cache"):
        quantize.check_fp8_supported("cpu")


def test_int4_without_a_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(quantize.INT4_PACK_OPS, "cpu", "_no_such_int4_op")
    with pytest.raises(QuantizationError, match="int4 has no kernel on cpu"):
        quantize.check_int4_supported("cpu")
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, intermediate_size=64, vocab_size=50))
    with pytest.raises(QuantizationError, match="int4 has no kernel"):
        quantize.apply_quantization(model, {"mode": "int4", "groupsize": 32}, "cpu")


def test_output_overlapping_the_source_is_refused_even_with_force(tmp_path, capsys):
    """`--output-dir X` for `--checkpoint X` said "pass --force"; doing so replaced the fp32 source
    with its int8 version. An output that is, holds or lies inside the source is refused, whatever
    the flags, however the path is spelled."""
    from dataclasses import asdict

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=64)
    source = tmp_path / "models" / "fp32"
    save_checkpoint(source, {"model_args": asdict(args), "quantization": None}, Transformer(args).state_dict())
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(source)
    cases = [
        (source, source, "is"),
        (source, link, "is"),
        (link, source, "is"),
        (source, source / ".." / "fp32", "is"),
        (source, source / "sub", "is inside"),
        (source, link / "sub", "is inside"),
        (source, source.parent, "contains"),
        (link, tmp_path, "contains"),
    ]
    for checkpoint, output, relation in cases:
        assert (
            quantize.main(["--checkpoint", str(checkpoint), "--mode", "int8", "--output-dir", str(output), "--force"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{relation} the source checkpoint" in err and "choose a directory outside it" in err, err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert [p.name for p in source.parent.iterdir()] == ["fp32"]  # no temp dirs either


def test_eval_quant_table_carries_commit_date_and_cpu_kernels():
    import datetime

    from scripts.eval_quant import provenance

    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    text = provenance()
    assert text.startswith(f"commit {head}"), text
    assert datetime.datetime.now(datetime.timezone.utc).date().isoformat() in text
    assert f"CPU kernels {torch.backends.cpu.get_cpu_capability()}" in text


def test_quantize_runs_as_a_script(smollm2_checkpoint, tmp_path):
    """`python quantize.py ...` as the README runs it: main() once ran before module-level names it
    needs were defined (a NameError for every model), which in-process calls of main() never saw."""
    out = tmp_path / "int8"
    argv = [sys.executable, str(REPO / "quantize.py"), "--checkpoint", str(smollm2_checkpoint), "--mode", "int8"]
    proc = subprocess.run([*argv, "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["quantization"] == {"mode": "int8"}


def test_int8_bf16_decode_on_the_cpu_uses_torchs_int8_kernel(quantized, monkeypatch):
    """bf16 decode rows on the CPU go through torch._weight_int8pack_mm (one read of the int8
    weight) and equal the dequantize-then-matmul reference; shapes and addresses it is not known
    to handle take the plain path. The loader gives int8 weights aligned memory for it."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    model, _ = load_model(quantized["int8"], "cpu", torch.bfloat16)
    assert all(t.data_ptr() % 64 == 0 for t in model.state_dict().values() if t.dtype == torch.int8)

    def check(linear, x):
        ref = (x.float() @ linear.weight.float().T) * linear.scales.float()
        out = linear(x)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2

    torch.manual_seed(0)
    for linear in (model.layers[0].attention.wqkv, model.layers[0].feed_forward.w2):
        for rows in (1, 2, 3, 4):
            check(linear, torch.randn(1, rows, linear.in_features, dtype=torch.bfloat16))
    assert calls == [1, 2, 3, 4] * 2
    calls.clear()
    check(model.layers[0].attention.wqkv, torch.randn(5, model.args.dim, dtype=torch.bfloat16))  # prefill
    w = model.layers[0].attention.wo
    storage = torch.empty(w.weight.numel() + 8, dtype=torch.int8)
    storage[8:].copy_(w.weight.flatten())
    w.weight = storage[8:].view_as(w.weight)  # a view at an unaligned address: 4 rows there crashed
    check(w, torch.randn(4, w.in_features, dtype=torch.bfloat16))
    odd = quantize.Int8Linear(40, 33)  # a shape it gave wrong values for
    odd.weight, odd.scales = quantize_int8(torch.randn(33, 40))
    check(odd, torch.randn(1, 40, dtype=torch.bfloat16))
    assert calls == []


def test_int4_mma_probe_reads_every_nibble_of_tinygemms_layout_once():
    """scripts/int4_mma_probe.py's CUDA kernel (issue 10's int4, GPU-timed only) feeds tinygemm's words to
    mma.m16n8k16 as A fragments, two row tiles an instruction: its index math, replayed in Python over
    gemv.int4_tinygemm_layout, puts every (row, k) nibble in its place exactly once."""
    from scripts.int4_mma_probe import check_layout

    assert check_layout() == 0


def test_int4_linear_routes_its_batch1_call_to_int4_mma_where_it_applies(monkeypatch):
    """FASTGEN_INT4_MMA=1: Int4Linear's one-row call goes to int4_mma.int4_mma_gemv with the padded row, the packed
    weight, the group size and the bf16 scales; rows > 1 stay on tinygemm. int4_mma.applies asks for CUDA, one
    row, a group of 32-128 and tinygemm's 8-inner-k-tile layout; config gives the probe's warps."""
    import int4_mma

    torch.manual_seed(0)
    n, k, groupsize = 64, 600, 64  # padded to 640 on the way in
    packed, scales_and_zeros = quantize_int4(torch.randn(n, k), groupsize)
    with torch.device("meta"):
        linear = Int4Linear(k, n, groupsize=groupsize)
    linear.load_state_dict({"weight": packed, "scales_and_zeros": scales_and_zeros}, assign=True)
    calls = []

    def fake_gemv(x, weight, group, sz):
        calls.append((x.shape, weight is linear.weight, group, sz.dtype))
        return torch.zeros(1, sz.shape[1], dtype=x.dtype)

    monkeypatch.setattr(int4_mma, "applies", lambda x, weight, group: x.shape[0] == 1)
    monkeypatch.setattr(int4_mma, "int4_mma_gemv", fake_gemv)
    assert linear(torch.randn(1, 1, k)).shape == (1, 1, n)
    assert calls == [((1, 640), True, groupsize, torch.bfloat16)]
    linear(torch.randn(3, k))  # three rows: tinygemm
    assert len(calls) == 1
    monkeypatch.undo()
    monkeypatch.setattr(int4_mma, "ENABLED", True)
    cpu_row, layout = torch.zeros(1, 4096), torch.zeros(512, 32, 32, 4, dtype=torch.int32)  # 8 inner k tiles
    assert not int4_mma.applies(cpu_row, layout, 64)  # on the CPU: tinygemm's CPU kernel
    assert (
        int4_mma.config(4096, 14336) == dict(tiles=2, warps=16, prefetch=False)
        and int4_mma.config(28672, 4096)["warps"] == 8
        and int4_mma.config(128256, 4096)["warps"] == 4  # the output head at one row
        and int4_mma.config(128256, 4096, rows=8)["warps"] == 8
    )


def test_int4_mma_launches_with_pdl_by_default_on_sm90_only(monkeypatch):
    """int4_mma's kernels launch with programmatic dependent launch by default (it won on the H100, 2026-12-06:
    2.204 -> 2.171 ms a step); FASTGEN_INT4_PDL=0 or FASTGEN_PDL=0 turns it off, and a CPU tensor or a GPU before
    sm_90 never gets it."""
    from types import SimpleNamespace

    import int4_mma
    import kv_attention

    def pdl_switch(env):  # int4_mma.PDL in a fresh process with this environment
        env = {k: v for k, v in os.environ.items() if k != "FASTGEN_INT4_PDL"} | env
        code = "import int4_mma; print(int4_mma.PDL)"
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True).stdout

    assert pdl_switch({}) == "True\n"  # the default
    assert pdl_switch({"FASTGEN_INT4_PDL": "0"}) == "False\n"

    cuda = SimpleNamespace(device=torch.device("cuda", 0))  # stands in for a CUDA tensor
    capability = {0: 9}
    monkeypatch.setattr(kv_attention, "_compute_capability", lambda index: capability[index])
    monkeypatch.setattr(kv_attention, "PDL", True)
    assert int4_mma.launches_with_pdl(cuda) == 1
    assert int4_mma.launches_with_pdl(torch.zeros(1)) == 0  # the CPU
    capability[0] = 8
    assert int4_mma.launches_with_pdl(cuda) == 0  # an A100
    capability[0] = 9
    monkeypatch.setattr(kv_attention, "PDL", False)  # FASTGEN_PDL=0
    assert int4_mma.launches_with_pdl(cuda) == 0
    monkeypatch.setattr(kv_attention, "PDL", True)
    monkeypatch.setattr(int4_mma, "PDL", False)  # FASTGEN_INT4_PDL=0
    assert int4_mma.launches_with_pdl(cuda) == 0


def test_int4_mma_without_nvcc_falls_back_to_tinygemm_with_one_warning(monkeypatch, capsys):
    """The CUDA kernel is built at load: without the CUDA toolkit Int4Linear stays on tinygemm after one warning
    line that names the fix; FASTGEN_INT4_MMA=1 (the kernel required) makes that a one-line error, =0 builds nothing."""
    import torch.utils.cpp_extension

    import int4_mma
    from errors import FastgenError

    attempts = []

    def no_toolkit(*args, **kwargs):
        attempts.append(1)
        raise OSError("CUDA_HOME environment variable is not set. Please set it to your CUDA install root.")

    def reset(mode):
        monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_toolkit)
        monkeypatch.setattr(int4_mma, "_extension", None)
        monkeypatch.setattr(int4_mma, "_build_failed", False)
        monkeypatch.setattr(int4_mma, "MODE", mode)
        monkeypatch.setattr(int4_mma, "ENABLED", mode != "0")
        attempts.clear()

    reset("auto")
    assert int4_mma.build() is None and int4_mma.build() is None  # tried once, warned once
    warning = capsys.readouterr().err
    assert attempts == [1] and warning.count("\n") == 1
    assert "tinygemm" in warning and "CUDA_HOME" in warning and "FASTGEN_INT4_MMA=0" in warning
    x, weight = torch.zeros(1, 4096), torch.zeros(512, 32, 32, 4, dtype=torch.int32)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    assert not int4_mma.applies(x, weight, 64)  # not built: tinygemm
    monkeypatch.setattr(int4_mma, "_extension", object())
    assert int4_mma.applies(x, weight, 64) and int4_mma.applies(x.expand(8, -1), weight, 64)
    assert not int4_mma.applies(x.expand(9, -1), weight, 64)  # prefill: tinygemm
    assert not int4_mma.applies(x, weight, 256)  # a group wider than the kernel's supertile: tinygemm
    monkeypatch.undo()

    reset("1")
    with pytest.raises(FastgenError, match=r"needs nvcc .* unset FASTGEN_INT4_MMA") as e:
        int4_mma.build()
    assert "\n" not in str(e.value) and "CUDA_HOME" in str(e.value)
    reset("0")
    assert int4_mma.build() is None and attempts == []


def test_int4_decode_block_step_equals_transformer_blocks(tmp_path, monkeypatch):
    """Int4DecodeBlock's batch-1 step (FASTGEN_INT4_FOLD=1) with int4_mma's four folds replaced by their references
    (tinygemm's CPU kernel) gives TransformerBlock's logits: the norms, RoPE and the cache write, SiLU(gate) * up
    and the residual adds are wired as the model has them, and every decode step goes through the folds. The
    kernels are held to the same references on a GPU (test_gpu). int4_decode_block_fits takes a dense bf16 block
    of packed CUDA Int4Linears with a bf16 cache, and nothing else."""
    import int4_mma
    from quantize import Int4DecodeBlock, int4_decode_block_fits, use_int4_decode_blocks

    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=384, vocab_size=96)
    config = {"model_args": {f: getattr(args, f) for f in args.__dataclass_fields__}, "quantization": None}
    save_checkpoint(tmp_path / "float", config, dict(Transformer(args).state_dict()))
    qdir = quantize_checkpoint(tmp_path / "float", "int4", 64, output_dir=tmp_path / "q")
    plain, _ = load_model(qdir, "cpu", torch.bfloat16)
    folded, _ = load_model(qdir, "cpu", torch.bfloat16)
    block = folded.layers[0]
    for m in (plain, folded):
        m.setup_caches(1, 32)
    assert not int4_decode_block_fits(block)  # on the CPU
    monkeypatch.setattr(int4_mma, "FOLD_ENABLED", True)
    monkeypatch.setattr(int4_mma, "_extension", object())  # as if built
    with monkeypatch.context() as on_a_gpu:
        on_a_gpu.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        assert int4_decode_block_fits(block)
        folded.setup_caches(1, 32, torch.float32)  # an fp32 cache: the kernel writes bf16
        use_int4_decode_blocks(folded)
        assert not any(type(layer) is Int4DecodeBlock for layer in folded.layers)
        folded.setup_caches(1, 32)
        use_int4_decode_blocks(folded)  # as Generator.setup does after each setup_caches
        assert all(type(layer) is Int4DecodeBlock for layer in folded.layers)
        assert block.rope_inv_freq is folded.inv_freq and block.rope_row_start is folded.row_start
    for m in (plain, folded):  # two slots of left padding: RoPE's position is the slot minus row_start
        m.set_row_starts(torch.full((1,), 2, dtype=torch.int32))

    calls = []

    def counted(reference):
        return lambda *a: calls.append(reference.__name__) or reference(*a)

    monkeypatch.setattr(int4_mma, "fold_applies", lambda x, weight, groupsize: x.shape[0] == 1)
    monkeypatch.setattr(int4_mma, "int4_mma_norm_rope_kv", counted(int4_mma.norm_rope_kv_reference))
    monkeypatch.setattr(int4_mma, "int4_mma_residual", counted(int4_mma.residual_reference))
    monkeypatch.setattr(int4_mma, "int4_mma_norm_glu", counted(int4_mma.norm_glu_reference))
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        want, got = plain(ids[:, :8], torch.arange(8)), folded(ids[:, :8], torch.arange(8))  # prefill: plain blocks
        assert torch.equal(got, want) and calls == []
        for pos in range(8, 12):
            want, got = (
                plain(ids[:, pos : pos + 1], torch.tensor([pos])),
                folded(ids[:, pos : pos + 1], torch.tensor([pos])),
            )
            assert ((got - want).norm() / want.norm()) < 1e-2, pos
    assert len(calls) == 4 * 4 * args.n_layers  # four folds a block, every decode step
    k_plain, k_folded = plain.layers[1].attention.kv_cache.k_cache, folded.layers[1].attention.kv_cache.k_cache
    assert ((k_folded[:, :, :12].float() - k_plain[:, :, :12].float()).norm() / k_plain.float().norm()) < 1e-2
