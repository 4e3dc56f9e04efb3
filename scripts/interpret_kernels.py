"""Checks kv_attention.decode_attention / quantized_decode_attention and gemv.s kernels against
their PyTorch references with Triton's CPU interpreter, no GPU needed. In a venv with
`pip install triton==3.6.0 "numpy<2.3"` beside the CPU torch (numpy 2.3+ breaks Triton 3.6's
interpreter: "only 0-dimensional arrays can be converted to Python scalars"):

    python scripts/interpret_kernels.py     # ~2.5 min on 2 cores; each case's relative error, exit 1 if one is off

CI runs it this way (.ci/run), in a venv of its own so the test suite runs without triton, as a CPU install does.

The interpreter has no inline PTX, so the int8 kernels run their plain-Triton conversion (CONVERT=1,
the same arithmetic as the prmt form); test_gpu.py checks that the conversions agree on a GPU.

Slots outside each row's valid range hold NaN: a kernel that reads one prints nan.
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import gemv  # noqa: E402
import kv_attention  # noqa: E402
from model import Experts, ModelArgs, MoEFeedForward  # noqa: E402

# Rounding leaves at most ~4e-3 (int4 weights); a kernel that indexes a wrong row, slot or split is off by ~1 or NaN
MAX_REL_ERR = 1e-2

CASES = [  # B, Hkv, G, D, cache slots, query slot, sliding window (0: none), dtype
    (2, 2, 4, 128, 1000, 700, 0, torch.float32),
    (1, 2, 4, 128, 4096, 1500, 0, torch.float32),  # 64 splits, a third of the cache filled
    (3, 1, 2, 80, 300, 299, 100, torch.float32),
    (2, 2, 4, 64, 257, 5, 0, torch.float16),
    (1, 2, 1, 64, 2048, 2047, 600, torch.float16),
    (2, 2, 4, 64, 50, 40, 0, torch.float32),  # one tile: one split writes the output, no merge
    # 8 splits of 2 tiles a row (run again below with the whole tiles between each row's ends unmasked)
    (4, 8, 2, 64, 1024, 1000, 0, torch.float32),
    (4, 8, 2, 64, 1024, 1000, 300, torch.float16),
]


def unquantized(B, Hkv, G, D, S, slot, window, dtype):
    q = torch.randn(B, Hkv * G, 1, D, dtype=dtype)
    k, v = torch.randn(2, B, Hkv, S, D, dtype=dtype)
    row_start = torch.tensor([min(7 * b, slot) for b in range(B)], dtype=torch.int32)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, slot + 1 :] = v_nan[:, :, slot + 1 :] = float("nan")
    for b in range(B):
        k_nan[b, :, : row_start[b]] = v_nan[b, :, : row_start[b]] = float("nan")
    q_slot = torch.tensor([slot])
    got = kv_attention.decode_attention(q, k_nan, v_nan, row_start, q_slot, window)
    want = kv_attention.quantized_decode_attention_reference(q, k, None, v, None, row_start, q_slot, window or None)
    return got, want


def with_switch(name, run, *args, value=True, **kwargs):
    """run(*args, **kwargs) with kv_attention's switch `name` on, or `value`."""
    before = getattr(kv_attention, name)
    setattr(kv_attention, name, value)
    try:
        return run(*args, **kwargs)
    finally:
        setattr(kv_attention, name, before)


def whole_tiles(run, *args, **kwargs):
    """run with the attention's unmasked loop over the tiles between a row's ends for any cache (by default only
    for caches of kv_attention.WHOLE_TILES_MIN_PER_SPLIT tiles a split, more than a case here has)."""
    return with_switch("WHOLE_TILES_MIN_PER_SPLIT", run, *args, value=1, **kwargs)


def int8(B=2, Hkv=2, G=4, D=128, S=3000, slot=2100, dtype=torch.float32):
    """An int8 cache."""
    q = torch.randn(B, Hkv * G, 1, D).to(dtype)
    k, v = torch.randint(-127, 128, (2, B, Hkv, S, D), dtype=torch.int8)
    k_scale, v_scale = torch.rand(B, Hkv, S, 1).to(dtype) / 100, (torch.rand(B, Hkv, S, 1) / 100).to(dtype)
    row_start, q_slot = torch.tensor([0, 30], dtype=torch.int32), torch.tensor([slot])
    got = kv_attention.quantized_decode_attention(q, k, k_scale, v, v_scale, row_start, q_slot, 0)
    want = kv_attention.quantized_decode_attention_reference(q, k, k_scale, v, v_scale, row_start, q_slot, None)
    return got, want


def int8_gemv(N=300, K=1030):
    x, w, scales = torch.randn(1, K), torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N) / 100
    return gemv.decode_gemv(x, w, scales), gemv.int8_gemv_reference(x, w, scales)


def decode_gemv(N=301, K=5000, dtype=torch.float32, norm=False, glu=False, residual=False, int8=False):
    """K > 4096: the 2048-wide K step; N odd: a half tile. The folded-in parts against the reference."""
    x = torch.randn(1, K, dtype=dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8) if int8 else torch.randn(N, K, dtype=dtype) / 30
    extra = dict(
        scales=torch.rand(N) / 3000 if int8 else None,
        norm_weight=torch.rand(K, dtype=dtype) + 0.5 if norm else None,
        residual=torch.randn(1, N, dtype=dtype) if residual else None,
        eps=1e-5 if norm else 0.0,
        glu=glu,
    )
    return gemv.decode_gemv(x, w, **extra), gemv.decode_gemv_reference(x, w, **extra)


def decode_gemv_experts(X=1, k=8, E=16, N=48, K=96, norm=True, glu=False):
    """A token's k experts (or X tokens' pairs) through decode_gemv_experts against its reference."""
    x, ids = torch.randn(X, K), torch.randint(0, E, (X * k,))
    w, norm_weight = torch.randn(E, N, K) / 10, torch.rand(K) + 0.5 if norm else None
    got = gemv.decode_gemv_experts(x, ids, w, norm_weight, 1e-5, glu)
    return got, gemv.decode_gemv_experts_reference(x, ids, w, norm_weight, 1e-5, glu)


def rope_write_kv(D=96, n_heads=6, n_kv_heads=2, qk_norm=True):
    """The query/key norms, RoPE and the cache write in one kernel against the reference: q, and the
    whole of both caches afterwards (one tensor, so one error)."""
    import kv_attention

    qkv = torch.randn(1, (n_heads + 2 * n_kv_heads) * D)
    angles = torch.rand(D // 2) * 6
    cos, sin = torch.cat((angles, angles)).cos(), torch.cat((angles, angles)).sin()
    norms = [torch.rand(D) + 0.5 if qk_norm else None for _ in range(2)]
    caches = [torch.randn(1, n_kv_heads, 12, D) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    slot = torch.tensor([7])
    want = kv_attention.rope_write_kv_reference(qkv, cos, sin, *want_caches, slot, n_heads, *norms, 1e-6)
    got = kv_attention.rope_write_kv(qkv, cos, sin, *caches, slot, n_heads, *norms, 1e-6)
    return torch.cat([got.flatten(), *(c.flatten() for c in caches)]), torch.cat(
        [want.flatten(), *(c.flatten() for c in want_caches)]
    )


def decode_gemv_rope_kv(n_heads=9, n_kv_heads=3, D=64, K=576, dtype=torch.float32, int8=False, bias=False, tiles=None):
    """wqkv's GEMV with RoPE and the cache write in its epilogue against decode_gemv then rope_write_kv's
    reference: q, and the whole of both caches afterwards (one tensor, so one error)."""
    N = (n_heads + 2 * n_kv_heads) * D
    x = torch.randn(1, K, dtype=dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8) if int8 else torch.randn(N, K, dtype=dtype) / 30
    scales = torch.rand(N) / 3000 if int8 else None
    norm_weight, b = torch.rand(K, dtype=dtype) + 0.5, torch.randn(1, N, dtype=dtype) if bias else None
    angles = torch.rand(D // 2) * 6
    cos, sin = (torch.cat((angles, angles)).cos().to(dtype), torch.cat((angles, angles)).sin().to(dtype))
    caches = [torch.randn(1, n_kv_heads, 12, D, dtype=dtype) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    slot = torch.tensor([7])
    want = gemv.decode_gemv_rope_kv_reference(x, w, scales, norm_weight, b, 1e-5, cos, sin, *want_caches, slot, n_heads)
    if tiles:  # another tile than the default (more pairs a program)
        rope = (cos, sin, *caches, slot, n_heads)
        got = gemv._decode_gemv_launch(x, w, None, scales, norm_weight, b, 1e-5, False, tiles, rope).view(want.shape)
    else:
        got = gemv.decode_gemv_rope_kv(x, w, scales, norm_weight, b, 1e-5, cos, sin, *caches, slot, n_heads)
    return torch.cat([got.flatten(), *(c.flatten() for c in caches)]), torch.cat(
        [want.flatten(), *(c.flatten() for c in want_caches)]
    )


def decode_block(layers=2, n_experts=0, rope_in_qkv=False):
    """A tiny model's decode step through gemv.DecodeBlock (the fused batch-1 path; with experts,
    the router and the token's experts through decode_gemv too) against the plain blocks' step, one
    token after a 5-token prefill."""
    from model import ModelArgs, Transformer

    experts = dict(n_experts=n_experts, n_active_experts=2 if n_experts else 0)
    args = ModelArgs(dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=50, **experts)
    m = Transformer(args)
    for layer in m.layers if n_experts else ():
        for weight in (layer.feed_forward.experts.w13, layer.feed_forward.experts.w2):
            torch.nn.init.normal_(weight, std=0.1)  # allocated empty: a checkpoint fills them
    m.setup_caches(1, 16)
    prompt = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        m(prompt, torch.arange(5))
        want = m(torch.tensor([[7]]), torch.tensor([5]))
        gemv.FUSED_DECODE_ENABLED = gemv.EXPERT_GEMV_ENABLED = True
        default, gemv.ROPE_IN_QKV = gemv.ROPE_IN_QKV, "1" if rope_in_qkv else "0"
        gemv.use_decode_kernels(m)
        assert type(m.layers[0]) is gemv.DecodeBlock
        try:
            return m(torch.tensor([[7]]), torch.tensor([5])), want
        finally:
            gemv.ROPE_IN_QKV = default


def int8_expert_gemv(R=6, E=8, N=96, K=1100, X=6, grouped=False):  # X < R: each x row through R / X experts
    x, ids = torch.randn(X, K, dtype=torch.float16), torch.randint(0, E, (R,))
    if grouped:  # a token's experts are distinct (top k): at most one pair per (token, expert)
        ids = torch.stack([torch.randperm(E)[: R // X] for _ in range(X)]).flatten()
    w, scales = torch.randint(-128, 128, (E, N, K), dtype=torch.int8), torch.rand(E, N, dtype=torch.float16) / 100
    op = gemv.int8_expert_gemm_grouped if grouped else gemv.int8_expert_gemv
    return op(x, ids, w, scales), gemv.int8_expert_gemv_reference(x, ids, w, scales)


def expert_down_mix(N=1, k=8, E=16, D=300, inter=700, dtype=torch.float32, residual=False):
    h, ids = torch.randn(N, k, inter, dtype=dtype), torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    mix, w = torch.rand(N, k).softmax(-1), torch.randn(E, D, inter, dtype=dtype) / 30
    want = gemv.expert_down_mix_reference(h, ids, mix, w)
    if not residual:
        return gemv.expert_down_mix(h, ids, mix, w), want
    res = torch.randn(N, D, dtype=dtype)
    return gemv.expert_down_mix(h, ids, mix, w, res), want + res


def route(N=3, E=128, k=8):
    """The router's pick: the chosen ids exactly, their weights (both compared, ids as floats)."""
    logits = torch.randn(N, E) * 3
    weights, ids = gemv.route(logits, k)
    want_weights, want_ids = gemv.route_reference(logits, k)
    return torch.cat([weights, ids.float()], dim=1), torch.cat([want_weights, want_ids.float()], dim=1)


def expert_gate_up(N, k, E, D=96, inter=80, dtype=torch.float32):
    """The grouped gate/up kernel against Experts.hidden (E small: tokens share experts)."""
    args = ModelArgs(
        dim=D, n_layers=1, n_heads=4, intermediate_size=inter, vocab_size=64, n_experts=E, n_active_experts=k
    )
    experts = Experts(args)
    torch.nn.init.normal_(experts.w13, 0, 0.1)
    w13 = experts.w13.detach().to(dtype)
    x, ids = torch.randn(N, D, dtype=dtype), torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    with torch.no_grad():
        return gemv.expert_gate_up(x, ids, w13), Experts.hidden(experts, x.float(), ids)


def down_mix_experts(tokens, gate_up=False):
    """A MoE layer whose experts became gemv.DownMixExperts (as Generator.setup does on a GPU) against
    the same layer's Experts: the model's wiring of expert_down_mix, at each tile (below and from 8),
    and with gate_up of expert_gate_up too."""
    gemv.EXPERT_GATE_UP_ENABLED = gate_up
    args = ModelArgs(
        dim=64, n_layers=1, n_heads=4, intermediate_size=48, vocab_size=64, n_experts=16, n_active_experts=2
    )
    ff = MoEFeedForward(args)  # 8 tokens x 2 = 16 pairs: still few enough to gather
    for p in ff.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(tokens, 1, 64)
    with torch.no_grad():
        want = ff(x)
        ff.experts.__class__ = gemv.DownMixExperts
        return ff(x), want


def main():
    torch.manual_seed(0)
    plain_config = gemv.int8_gemv_config
    gemv.int8_gemv_config = lambda n, k: {**plain_config(n, k), "CONVERT": 1}  # no inline PTX here
    gemv.INT8_CONVERT = 1
    kv_attention.KV_ASM = False
    runs = [(f"{case}", lambda case=case: unquantized(*case)) for case in CASES] + [("int8 KV", int8)]
    runs += [("int8 KV, one tile: one split, no merge", lambda: int8(S=50, slot=40))]
    runs += [(f"{case}, whole tiles", lambda case=case: whole_tiles(unquantized, *case)) for case in CASES[-2:]]
    runs += [("int8 KV, 32 splits of 2 tiles a row, whole tiles", lambda: whole_tiles(int8, Hkv=8, S=4096, slot=3000))]
    runs += [
        (
            "(1, 3, 3, 64, 216, 200), SmolLM2's 4 tiles in 4 splits and a merge (the default)",
            lambda: with_switch(
                "SINGLE_SPLIT_MAX_TILES", unquantized, 1, 3, 3, 64, 216, 200, 0, torch.float32, value=1
            ),
        )
    ]
    runs += [
        (
            "(1, 3, 3, 64, 216, 200), 4 tiles in one split (SINGLE_SPLIT_MAX_TILES 4)",
            lambda: with_switch(
                "SINGLE_SPLIT_MAX_TILES", unquantized, 1, 3, 3, 64, 216, 200, 0, torch.float32, value=4
            ),
        )
    ]
    runs += [("int8 gemv", int8_gemv), ("int8 expert gemv", int8_expert_gemv)]
    runs += [
        ("decode gemv, fp32, K 5000", decode_gemv),
        ("decode gemv, fp16, 576", lambda: decode_gemv(960, 576, torch.float16)),
        ("decode gemv + norm + residual", lambda: decode_gemv(97, 576, norm=True, residual=True)),
        ("decode gemv + norm, SiLU(gate) * up of the halves", lambda: decode_gemv(3072, 576, norm=True, glu=True)),
        ("decode gemv, SiLU(gate) * up, odd halves, fp16", lambda: decode_gemv(70, 1536, torch.float16, glu=True)),
        ("decode gemv + norm, K 5000, fp16", lambda: decode_gemv(40, 5000, torch.float16, norm=True)),
        ("decode gemv, int8 weight + norm", lambda: decode_gemv(70, 1100, norm=True, int8=True)),
        ("decode gemv experts, 8 of 16, norm", decode_gemv_experts),
        (
            "decode gemv experts, norm + SiLU * up, 1 token x 8",
            lambda: decode_gemv_experts(1, 8, 16, 96, 200, True, True),
        ),
        ("decode gemv experts, SiLU * up, 3 tokens x 2", lambda: decode_gemv_experts(3, 2, 5, 30, 1100, False, True)),
        ("decode gemv, int8, norm + SiLU * up", lambda: decode_gemv(66, 5000, norm=True, glu=True, int8=True)),
        # tiles that divide the weight: an int8 weight's kernel is then built without masks (a float one keeps them)
        (
            "decode gemv, K 2048 in whole steps, norm + residual",
            lambda: decode_gemv(64, 2048, norm=True, residual=True),
        ),
        ("decode gemv, K 2048 in whole steps, SiLU(gate) * up", lambda: decode_gemv(128, 2048, norm=True, glu=True)),
        ("decode gemv, whole tiles, int8", lambda: decode_gemv(64, 1024, int8=True)),
        (
            "decode gemv, whole tiles, int8, SiLU(gate) * up",
            lambda: decode_gemv(128, 2048, norm=True, glu=True, int8=True),
        ),
        ("decode gemv experts, K 1024 in whole steps", lambda: decode_gemv_experts(1, 8, 16, 64, 1024, True, True)),
    ]
    runs += [("int8 expert gemv, 1 token x 8 experts", lambda: int8_expert_gemv(R=8, X=1))]
    runs += [("int8 expert gemv, 3 tokens x 2 experts", lambda: int8_expert_gemv(R=6, X=3))]
    runs += [("int8 grouped experts, 8 tokens x 2 of 8", lambda: int8_expert_gemv(R=16, X=8, grouped=True))]
    runs += [("int8 grouped experts, 16 pairs x 1 of 4", lambda: int8_expert_gemv(R=16, E=4, X=16, grouped=True))]
    runs += [("bf16-expert down + mix, 1 token x 8 of 16", expert_down_mix)]
    runs += [
        ("bf16-expert down + mix, 3 tokens x 2 of 8, fp16", lambda: expert_down_mix(3, 2, 8, 96, 250, torch.float16))
    ]
    runs += [("bf16-expert down + mix + residual, 1 token x 8 of 16", lambda: expert_down_mix(residual=True))]
    runs += [("route, 3 tokens, 8 of 128", route), ("route, 1 token, 3 of 10", lambda: route(1, 10, 3))]
    runs += [("expert gate/up, 2 tokens x 2 of 16", lambda: expert_gate_up(2, 2, 16))]
    runs += [("expert gate/up, 8 tokens x 2 of 4 (shared experts)", lambda: expert_gate_up(8, 2, 4))]
    runs += [("expert gate/up, 16 tokens x 8 of 8, fp16", lambda: expert_gate_up(16, 8, 8, 64, 48, torch.float16))]
    gemv.available, gemv.EXPERT_DOWN_ENABLED = lambda t: True, True  # CPU tensors, the kernel on
    runs += [
        ("rope + cache write, qk norm, D 96", rope_write_kv),
        ("rope + cache write, D 64", lambda: rope_write_kv(64, 9, 3, False)),
    ]
    runs += [("DecodeBlock, a 2-layer model's decode step", decode_block)]
    runs += [
        ("wqkv + rope + cache write, SmolLM2's heads", decode_gemv_rope_kv),
        (
            "wqkv + rope + cache write, fp16, bias, D 128",
            lambda: decode_gemv_rope_kv(4, 2, 128, 1100, torch.float16, bias=True),
        ),
        ("wqkv + rope + cache write, int8 weight", lambda: decode_gemv_rope_kv(6, 2, 64, 1030, int8=True)),
        (
            "wqkv + rope + cache write, 4 pairs a program, 2 warps",
            lambda: decode_gemv_rope_kv(tiles=dict(BLOCK_N=4, BLOCK_K=256, num_warps=2)),
        ),
        (
            "wqkv + rope + cache write, whole tiles (64-wide K steps), int8",
            lambda: decode_gemv_rope_kv(int8=True, tiles=dict(BLOCK_N=4, BLOCK_K=64, num_warps=2)),
        ),
        ("DecodeBlock, wqkv + rope + cache write in one kernel", lambda: decode_block(rope_in_qkv=True)),
    ]
    runs += [("DecodeBlock, a 2-layer MoE model's decode step, 2 of 8 experts", lambda: decode_block(2, 8))]

    # kv_attention.PDL: an eager MoE block picks with route, mixes with expert_down_mix
    runs += [("DecodeBlock, MoE, eager with PDL (route, down + mix)", lambda: with_switch("PDL", decode_block, 2, 8))]
    runs += [(f"DownMixExperts, {n} tokens x 2 of 16", lambda n=n: down_mix_experts(n)) for n in (2, 4, 8)]
    runs += [
        (f"DownMixExperts + gate/up kernel, {n} tokens x 2 of 16", lambda n=n: down_mix_experts(n, True))
        for n in (2, 8)
    ]
    failed = []
    for name, run in runs:
        got, want = run()
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        print(f"{name}: rel err {err:.2e}")
        if not err < MAX_REL_ERR:  # NaN fails too: a kernel read a slot outside the valid range
            failed.append(name)
    if failed:
        sys.exit(f"{len(failed)} of {len(runs)} cases off by more than {MAX_REL_ERR:g}: {'; '.join(failed)}")
    print(f"all {len(runs)} cases within {MAX_REL_ERR:g}")


if __name__ == "__main__":
    main()
