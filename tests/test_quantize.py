"""Weight and KV-cache quantization: kernels against references, accuracy pinned on the real
SmolLM2 and Botchan, the quantize CLI round trip, and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantize
from generate import Generator, Sampling, load_model
from model import ModelArgs, Transformer
from quantize import (Int4Linear, QuantizationError, QuantizedKVCache, dequantize_int4, quantize_checkpoint,
                      quantize_int4, quantize_int8)

REPO = Path(__file__).resolve().parent.parent
PASSAGE_TOKENS = 1024  # the tests score a shorter passage than BENCHMARKS.md's 4096 tokens


@pytest.mark.parametrize("groupsize", [32, 64, 128])
def test_int4_matmul_equals_dequantize_then_matmul(groupsize):
    torch.manual_seed(groupsize)
    n, k = 256, 512
    weight = torch.randn(n, k)
    packed, scales_and_zeros = quantize_int4(weight, groupsize)
    linear = Int4Linear(k, n, groupsize=groupsize)
    linear.load_state_dict({"weight": packed, "scales_and_zeros": scales_and_zeros})
    assert linear.is_packed
    x = torch.randn(7, k)
    # the kernel takes bf16 activations and scales: the reference rounds them the same way
    sz_bf16 = scales_and_zeros.to(torch.bfloat16).float()
    ref = x.to(torch.bfloat16).float() @ dequantize_int4(packed, sz_bf16, groupsize).t()
    out = linear(x)
    assert ((out - ref).norm() / ref.norm()) < 2e-3
    # and the dequantized weight is close to the original (4 bits: ~1/15 of each group's range)
    err = (dequantize_int4(packed, scales_and_zeros, groupsize) - weight).abs()
    group_range = weight.view(n, -1, groupsize).amax(-1) - weight.view(n, -1, groupsize).amin(-1)
    assert (err.view(n, -1, groupsize) <= group_range[..., None] / 30 + 1e-6).all()


def test_int8_round_trip():
    w = torch.randn(64, 96)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_cache_is_half_the_memory_and_close(storage):
    B, H, S, D = 2, 3, 256, 64
    cache = QuantizedKVCache(B, H, S, D, storage, torch.bfloat16)
    plain_bytes = 2 * B * H * S * D * 2  # a bf16 K and V
    quant_bytes = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert quant_bytes <= 0.55 * plain_bytes
    k, v = torch.randn(B, H, 5, D, dtype=torch.bfloat16), torch.randn(B, H, 5, D, dtype=torch.bfloat16)
    pos = torch.arange(100, 105)
    k_all, v_all = cache.update(pos, k, v)
    tol = 0.01 if storage == torch.int8 else 0.07  # e4m3 keeps 3 mantissa bits
    for got, want in ((k_all[:, :, 100:105], k), (v_all[:, :, 100:105], v)):
        assert ((got.float() - want.float()).norm() / want.float().norm()) < tol
    assert (k_all[:, :, :100] == 0).all()  # written in place, nowhere else


def test_quantized_kv_cache_generation_matches_plain():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                                  vocab_size=97)).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 1.0)
    gen = Generator(model)
    prompts = [[5, 17, 3, 88, 41], [60, 1]]
    gen.setup(2, 64)
    plain = gen.generate(prompts, 12, Sampling()).tokens
    gen.setup(2, 64, torch.int8)
    assert isinstance(model.layers[0].attention.kv_cache, QuantizedKVCache)
    assert gen.generate(prompts, 12, Sampling()).tokens == plain


@pytest.fixture(scope="module")
def quantized(smollm2_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant")
    return {
        "int8": quantize_checkpoint(smollm2_checkpoint, "int8", output_dir=out / "int8"),
        "int4-g32": quantize_checkpoint(smollm2_checkpoint, "int4", 32, output_dir=out / "int4-g32"),
    }


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
    for name, mode in (("int8", {"mode": "int8"}), ("int4-g32", {"mode": "int4", "groupsize": 32})):
        config = json.loads((quantized[name] / "config.json").read_text())
        assert config["quantization"] == mode
        assert (quantized[name] / "tokenizer.json").is_file()
        out_json = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint", str(quantized[name]),
                               "--device", "cpu", "--chat-template", "--prompt", "What is the capital of France?",
                               "--temperature", "0", "--max-new-tokens", "12", "--json", str(out_json)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Paris" in json.loads(out_json.read_text())["rows"][0]["completion"]
    model, _ = load_model(quantized["int8"], "cpu", torch.float32)
    assert isinstance(model.layers[0].feed_forward.w13, quantize.Int8Linear)


def run_cli(*argv):
    return subprocess.run([sys.executable, str(REPO / "quantize.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line_and_leave_nothing(smollm2_checkpoint, quantized, tmp_path):
    cases = [
        ((quantized["int8"], "--mode", "int4", "--output-dir", tmp_path / "a"), "already quantized"),
        ((smollm2_checkpoint, "--mode", "int4", "--groupsize", 128, "--output-dir", tmp_path / "b"),
         "does not divide in_features 576"),
        ((smollm2_checkpoint, "--mode", "int8", "--output-dir", quantized["int8"]), "already exists"),
        ((tmp_path / "missing", "--mode", "int8", "--output-dir", tmp_path / "c"), "does not exist"),
        ((smollm2_checkpoint, "--mode", "int8", "--groupsize", 32, "--output-dir", tmp_path / "d"),
         "only applies to --mode int4"),
    ]
    for argv, message in cases:
        proc = run_cli("--checkpoint", *argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp dirs


def test_int4_without_a_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(quantize.INT4_PACK_OPS, "cpu", "_no_such_int4_op")
    with pytest.raises(QuantizationError, match="int4 has no kernel on cpu"):
        quantize.check_int4_supported("cpu")
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, intermediate_size=64, vocab_size=50))
    with pytest.raises(QuantizationError, match="int4 has no kernel"):
        quantize.apply_quantization(model, {"mode": "int4", "groupsize": 32}, "cpu")
