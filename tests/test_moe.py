"""Mixture of experts (Mixtral, Qwen3-MoE) against Hugging Face transformers on tiny random models.

Each model goes HF save_pretrained -> our converter -> our Transformer, then: prefill and 24 greedy
decode steps match HF's logits (fp32, relative error < 1e-4) with HF's tokens; the experts our
router picks equal HF's router's picks at every step; a batch of different-length prompts gives
each prompt's tokens alone; the grouped paths (sort-and-loop, torch._grouped_mm) equal the gather
path. Bad configs and checkpoints fail with one line naming the problem.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import model as model_module
from checkpoint import CheckpointError, model_args_from_hf_config, model_args_from_name
from generate import Generator
from model import Experts, ModelArgs, MoEFeedForward, Transformer, top_k_by_max

transformers = pytest.importorskip("transformers")

from scripts.convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from tests.test_parity_hf import DECODE_STEPS, PROMPT_LEN, TOL, load_ours, rel_err  # noqa: E402

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.1,
)
FAMILIES = {
    # 4 experts, top 2 (Mixtral's 8 / 2 in small)
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    # 8 experts, top 3, per-head q/k norm, normalised top-k (Qwen3-30B-A3B's 128 / 8)
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
}


def make_hf_moe(family: str, seed: int = 0, **overrides):
    cls_name, family_overrides = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **family_overrides, **overrides})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("gate.weight"):  # a router with clear preferences: no near-ties
                p.normal_(0.0, 1.0)
    return hf.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    """(family, HF model, our model converted from its save_pretrained)."""
    tmp = tmp_path_factory.mktemp(request.param)
    hf = make_hf_moe(request.param)
    hf.save_pretrained(tmp / "hf")
    ours = load_ours(convert_hf_checkpoint(tmp / "hf", tmp / "ours"))
    return request.param, hf, ours


def hf_router_choices(hf, ids):
    """Per layer, the experts HF's router picks for each token of `ids` [1, T]: [T, k] sorted."""
    picks = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, out: picks.append(out[2].sort(-1).values))
        for layer in hf.model.layers
    ]
    try:
        logits = hf(ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return logits, picks


def our_router_choices(ours, tokens, input_pos):
    """Our logits, and per layer the experts our router picks for each token: [B * T, k] sorted."""
    picks = []
    hooks = [
        layer.feed_forward.register_forward_hook(
            lambda m, i, out: picks.append(m.route(i[0].flatten(0, 1))[1].sort(-1).values)
        )
        for layer in ours.layers
    ]
    try:
        logits = ours(tokens, input_pos)
    finally:
        for h in hooks:
            h.remove()
    return logits, picks


@torch.no_grad()
def test_parity_and_router_choices(converted):
    """Prefill and 24 greedy decode steps: HF's logits (rel err < 1e-4), HF's tokens, and at every
    step each layer's router picks the experts HF's router picks."""
    family, hf, ours = converted
    n_experts = hf.config.num_local_experts if family == "mixtral" else hf.config.num_experts
    assert ours.args.n_experts == n_experts and isinstance(ours.layers[0].feed_forward, MoEFeedForward)
    assert ours.args.qk_norm == (family == "qwen3-moe")
    seq = torch.randint(0, hf.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    ours.setup_caches(1, PROMPT_LEN + DECODE_STEPS)
    logits, picks = our_router_choices(ours, seq, torch.arange(PROMPT_LEN))
    ref, ref_picks = hf_router_choices(hf, seq)
    assert rel_err(logits, ref) < TOL, f"prefill rel err {rel_err(logits, ref):.2e}"
    assert all(torch.equal(a, b) for a, b in zip(picks, ref_picks, strict=True)), "prefill router choices differ"
    distinct = set()
    for step in range(DECODE_STEPS):
        tok = logits[:, -1].argmax(-1)
        assert tok.item() == ref[:, -1].argmax(-1).item(), f"greedy tokens diverge at step {step}"
        seq = torch.cat([seq, tok.view(1, 1)], dim=1)
        pos = seq.shape[1] - 1
        logits, picks = our_router_choices(ours, tok.view(1, 1), torch.tensor([pos]))
        ref, ref_picks = hf_router_choices(hf, seq)  # HF recomputes the whole sequence: no cache to trust
        ref = ref[:, -1:]
        assert rel_err(logits, ref) < TOL, f"decode step {step} rel err {rel_err(logits, ref):.2e}"
        for layer, (a, b) in enumerate(zip(picks, ref_picks, strict=True)):
            assert torch.equal(a, b[-1:]), f"step {step} layer {layer}: ours {a.tolist()} HF {b[-1:].tolist()}"
            distinct.add(tuple(a.flatten().tolist()))
    assert len(distinct) > 3, "the router should pick different experts over the steps"


@torch.no_grad()
def test_batch_of_different_lengths_equals_each_alone(converted):
    _, hf, ours = converted
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 7)]
    gen = Generator(ours)
    gen.setup(len(prompts), 11 + 12)
    batched = gen.generate(prompts, 12).tokens
    for p, tokens in zip(prompts, batched, strict=True):
        gen.setup(1, 11 + 12)
        assert gen.generate([p], 12).tokens[0] == tokens


@torch.no_grad()
def test_decode_router_equals_topk():
    """The compiled decode step routes with a reduction and k rounds of max (two fused kernels)
    instead of cuBLAS and torch.topk: the same experts in the same order, the same weights."""
    torch.manual_seed(0)
    probs = torch.randn(5, 128).softmax(-1)
    probs[0, 7] = probs[0, 9] = probs[0].max() + 0.1  # a tie: ours takes the lowest id first
    for k in (2, 8):
        weights, ids = top_k_by_max(probs, k)
        want_weights, want_ids = probs.topk(k, dim=-1)
        assert ids[0, :2].tolist() == [7, 9] and sorted(want_ids[0, :2].tolist()) == [7, 9]  # topk: either
        assert torch.equal(ids[0, 2:], want_ids[0, 2:]) and torch.equal(ids[1:], want_ids[1:])
        assert torch.equal(weights, want_weights)
    args = ModelArgs(
        dim=32, n_layers=1, n_heads=4, intermediate_size=16, vocab_size=64, n_experts=16, n_active_experts=4
    )
    ff = MoEFeedForward(args)
    for p in ff.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(3, 32)
    compiled = torch.compile(lambda x: ff.route(x, few=True), fullgraph=True)
    (weights, ids), (want_weights, want_ids) = compiled(x), ff.route(x)
    assert torch.equal(ids, want_ids)
    assert rel_err(weights, want_weights) < 1e-5


@torch.no_grad()
def test_grouped_paths_equal_gather(monkeypatch):
    """Prefill groups (token, expert) pairs by expert; decode gathers the chosen experts: the same
    numbers. torch._grouped_mm runs on the CPU too in recent torch, which checks our offsets."""
    torch.manual_seed(0)
    args = ModelArgs(
        dim=32, n_layers=1, n_heads=4, intermediate_size=16, vocab_size=64, n_experts=6, n_active_experts=2
    )
    ff = MoEFeedForward(args)
    for p in ff.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(3, 9, 32)
    weights, ids = ff.route(x.flatten(0, 1))
    ref = ff.experts.gathered(x.flatten(0, 1), ids)
    looped = ff.experts.grouped(x.flatten(0, 1), ids, use_grouped_mm=False)
    assert rel_err(looped, ref) < 1e-6
    if hasattr(torch, "_grouped_mm"):
        try:
            grouped = ff.experts.grouped(x.flatten(0, 1), ids, use_grouped_mm=True)
        except RuntimeError as e:  # older torch: CUDA only
            pytest.skip(f"torch._grouped_mm does not run on the CPU here ({e})")
        assert rel_err(grouped, ref) < 1e-6
        monkeypatch.setattr(model_module, "grouped_mm_available", lambda x, experts: True)
        assert rel_err(ff(x), (ref * weights.unsqueeze(-1)).sum(1).view_as(x)) < 1e-6


def test_mixed_is_the_weighted_sum_and_cpu_experts_keep_their_class():
    """Experts.mixed (the decode path's gathered outputs, weighted and summed) equals the sum written
    out; gemv.use_decode_kernels gives the kernel classes only to experts and linears on a GPU."""
    import gemv

    torch.manual_seed(0)
    args = ModelArgs(
        dim=32, n_layers=1, n_heads=4, intermediate_size=16, vocab_size=64, n_experts=6, n_active_experts=2
    )
    m = Transformer(args)
    ff = m.layers[0].feed_forward
    for p in ff.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(5, 32)
    weights, ids = ff.route(x)
    want = (ff.experts.gathered(x, ids) * weights.unsqueeze(-1)).sum(1)
    assert rel_err(ff.experts.mixed(x, ids, weights), want) < 1e-6
    gemv.use_decode_kernels(m)
    assert type(ff.experts) is Experts and type(m.output) is torch.nn.Linear
    ff.experts.__class__ = gemv.DownMixExperts  # on the CPU it falls back to Experts.mixed
    assert rel_err(ff.experts.mixed(x, ids, weights), want) < 1e-6


def test_named_configs_match_hf_configs():
    """The named shapes are what from_hf_config makes of the real config.json values."""
    qwen3_30b = dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
    )
    assert model_args_from_hf_config(qwen3_30b) == model_args_from_name("qwen3-30b-a3b")
    mixtral = dict(
        model_type="mixtral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        sliding_window=None,
        router_jitter_noise=0.0,
    )
    assert model_args_from_hf_config(mixtral) == model_args_from_name("mixtral-8x7b")
    for name in ("mixtral-8x22b", "qwen3-235b-a22b"):
        with torch.device("meta"):
            Transformer(model_args_from_name(name))


@pytest.mark.parametrize(
    "family,field,value,words",
    [
        ("mixtral", "router_jitter_noise", 0.1, "router_jitter_noise"),
        ("qwen3-moe", "norm_topk_prob", False, "norm_topk_prob=false"),
        ("qwen3-moe", "shared_expert_intermediate_size", 64, "shared experts"),
        ("qwen3-moe", "mlp_only_layers", [1], "mlp_only_layers"),
    ],
)
def test_unimplemented_config_fields_are_errors(family, field, value, words, tmp_path):
    hf = make_hf_moe(family)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(dict(cfg, **{field: value})))
    with pytest.raises(CheckpointError, match=words) as e:
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    assert "\n" not in str(e.value) and not (tmp_path / "ours").exists()


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_wrong_expert_count_names_tensor_and_counts(change, tmp_path):
    """A checkpoint whose experts do not match the config's count: the tensor and both counts."""
    hf = make_hf_moe("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    # 4 experts in the file: tell the config 5 (one missing) or 3 (one extra)
    path.write_text(json.dumps(dict(cfg, num_local_experts=5 if change == "missing" else 3)))
    with pytest.raises(CheckpointError) as e:
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    msg = str(e.value)
    want = (
        "missing tensor model.layers.0.block_sparse_moe.experts.4.w1.weight"
        if change == "missing"
        else ("unexpected tensor model.layers.0.block_sparse_moe.experts.3.w1.weight")
    )
    assert want in msg and "has 4 experts" in msg and f"num_local_experts={5 if change == 'missing' else 3}" in msg
    assert "\n" not in msg and not (tmp_path / "ours").exists()


def test_converted_checkpoint_with_wrong_expert_count_is_refused(converted, tmp_path):
    """Our own checkpoint whose stacked experts disagree with its config: the tensor and both shapes."""
    from checkpoint import load_model, save_checkpoint

    family, _, ours = converted
    tensors = dict(ours.state_dict())
    tensors["layers.1.feed_forward.experts.w2"] = tensors["layers.1.feed_forward.experts.w2"][:-1]
    config = {"model_args": dict(ours.args.__dict__), "quantization": None}
    save_checkpoint(tmp_path / "bad", config, tensors)
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.experts\.w2 has shape \[\d+,"):
        load_model(tmp_path / "bad", "cpu", torch.float32)
    shutil.rmtree(tmp_path / "bad")


@pytest.mark.parametrize("mode,groupsize", [("int8", None), ("int4", 32)])
@torch.no_grad()
def test_quantized_experts(converted, mode, groupsize, tmp_path):
    """int8 / int4 experts: the router stays in the compute dtype, and the quantized model's logits
    (prefill through the grouped loop, decode through the gather) equal a float model holding the
    dequantized expert weights."""
    from checkpoint import load_model, save_checkpoint
    from quantize import Int4Experts, Int8Experts, quantize_checkpoint

    _, _, ours = converted
    config = {"model_args": dict(ours.args.__dict__), "quantization": None}
    save_checkpoint(tmp_path / "fp32", config, ours.state_dict())
    out = quantize_checkpoint(tmp_path / "fp32", mode, groupsize)
    qmodel, _ = load_model(out, "cpu", torch.float32)
    ff = qmodel.layers[0].feed_forward
    assert isinstance(ff.experts, Int8Experts if mode == "int8" else Int4Experts)
    assert type(ff.gate) is torch.nn.Linear and ff.gate.weight.dtype == torch.float32
    assert ff.experts.w13.dtype == (torch.int8 if mode == "int8" else torch.uint8)

    tokens = torch.randint(0, ours.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    step = tokens[:, -1:]

    def prefill_and_step():
        qmodel.setup_caches(2, 16)
        return qmodel(tokens, torch.arange(9)), qmodel(step, torch.tensor([9]))

    quantized = prefill_and_step()
    # the reference: the same model with each layer's experts as float Experts holding the dequantized weights
    all_experts = torch.arange(ours.args.n_experts)
    for layer in qmodel.layers:
        float_experts = Experts(ours.args)
        for name in ("w13", "w2"):
            getattr(float_experts, name).data = layer.feed_forward.experts.weights(name, all_experts)
        layer.feed_forward.experts = float_experts
    for got, want in zip(quantized, prefill_and_step(), strict=True):
        assert rel_err(got, want) < 1e-5
    # and close to the unquantized model
    ours.setup_caches(2, 16)
    assert rel_err(quantized[0], ours(tokens, torch.arange(9))) < (0.05 if mode == "int8" else 0.3)


def test_bench_counts_active_bytes():
    """The benchmark's GB/s for a mixture counts the chosen experts' bytes, not all of them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # as tests/test_bench.py does
    import bench_plan
    from bench_ours import active_weight_bytes, experts_read_per_layer

    args = model_args_from_name("qwen3-30b-a3b")
    assert 30.0e9 < bench_plan.param_count(args) < 31.0e9  # Qwen3-30B-A3B: 30.5B parameters
    assert experts_read_per_layer(args, 1) == pytest.approx(8)
    assert 8 < experts_read_per_layer(args, 8) < 64
    tiny = ModelArgs(
        dim=32, n_layers=2, n_heads=4, intermediate_size=16, vocab_size=64, n_experts=8, n_active_experts=2
    )
    m = Transformer(tiny)
    expert = sum(t.numel() * 4 for n, t in m.state_dict().items() if ".experts." in n)
    other = sum(t.numel() * 4 for n, t in m.state_dict().items() if ".experts." not in n and "tok_emb" not in n)
    assert active_weight_bytes(m, 1) == other + expert // 4
    jobs = bench_plan.plan_jobs("moe", False, bench_plan.MOE_MODELS, ["bf16", "int8"], ["bf16"], [1, 8], [16], ["just"])
    assert [(c.model, c.weights, c.batch) for _, c in jobs][:2] == [
        ("qwen3-30b-a3b", "bf16", 1),
        ("qwen3-30b-a3b", "bf16", 8),
    ]


# ----------------------------------------------------------------------------- GPU tier (python -m pytest -m gpu)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_ARGS = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=512, n_experts=8)
GPU_PROMPTS = [[5, 17, 3, 88, 41, 2, 9, 300, 411, 7], [60, 1, 7], list(range(100, 141)), [12]]


def random_moe(seed=0, **overrides) -> Transformer:
    """A random fp32 MoE on the CPU whose logits and router choices are spread far from ties."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(**{**GPU_ARGS, "n_active_experts": 2, **overrides})).eval()
    with torch.no_grad():
        m.tok_embeddings.weight.normal_(0, 1.0)
        m.output.weight.normal_(0, 1.0)
        for layer in m.layers:
            layer.feed_forward.gate.weight.normal_(0, 1.0)
            for p in layer.feed_forward.experts.parameters():
                p.normal_(0, 0.1)
    return m


def on_cuda(m: Transformer, dtype=torch.float32) -> Transformer:
    copy = Transformer(m.args).eval()
    copy.load_state_dict(m.state_dict())
    return copy.to(device="cuda", dtype=dtype)


def greedy_tokens(m, prompts, n, compile=False):
    gen = Generator(m, compile=compile)
    gen.setup(len(prompts), 64)
    return gen.generate(prompts, n).tokens


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "batch, down_mix, gate_up, fused",
    [(1, False, False, False), (1, False, False, True), (1, False, False, "experts"), (4, False, False, False)]
    + [(4, True, False, False), (4, True, True, False)],
)
def test_gpu_compiled_moe_decode_equals_cpu_fp32_eager(monkeypatch, batch, down_mix, gate_up, fused):
    """fp32: the compiled CUDA-graph decode gives the CPU eager tokens, batch 1 (the gather path:
    Inductor fuses the gather into its reduction; fused: the attention half through gemv.DecodeBlock,
    the fused block, and with "experts" the router and the token's experts through decode_gemv too) and a
    batch of different lengths (4 tokens x 2 of 8 experts: the gather path, and with the kernel on
    (the default) gemv.expert_down_mix for the down projection and the mix)."""
    import gemv

    monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", bool(fused))
    monkeypatch.setattr(gemv, "EXPERT_GEMV_ENABLED", fused == "experts")
    monkeypatch.setattr(gemv, "EXPERT_DOWN_ENABLED", down_mix)
    monkeypatch.setattr(gemv, "EXPERT_GATE_UP_ENABLED", gate_up)  # its gate/up kernel too (default on)
    torch._dynamo.reset()
    cpu = random_moe()
    prompts = GPU_PROMPTS[:batch]
    cuda = on_cuda(cpu)
    assert greedy_tokens(cuda, prompts, 20, compile=True) == greedy_tokens(cpu, prompts, 20)
    experts = cuda.layers[0].feed_forward.experts
    assert type(experts) is gemv.DownMixExperts
    assert type(cpu.layers[0].feed_forward.experts) is Experts  # the CPU model keeps Experts
    # the route the decode step took, checked eagerly (a counter inside the compiled step would be a
    # guard that recompiles every step): the kernel with it on at 4 tokens, never at 1 or when off
    calls = []
    kernel = gemv.expert_down_mix
    monkeypatch.setattr(gemv, "expert_down_mix", lambda *a: calls.append(a[0].shape) or kernel(*a))
    x = torch.randn(batch, GPU_ARGS["dim"], device="cuda")
    with torch.no_grad():
        weights, ids = cuda.layers[0].feed_forward.route(x)
        got = experts.mixed(x, ids, weights)
        assert rel_err(got, Experts.mixed(experts, x, ids, weights)) < 1e-5
    assert calls == ([(batch, 2, GPU_ARGS["intermediate_size"])] if down_mix else [])


@pytest.mark.gpu
@needs_cuda
@torch.no_grad()
def test_gpu_grouped_mm_decode_compiled_equals_eager_fp32():
    """bf16 on sm_90, 8 tokens x 2 experts > 8 experts: torch._grouped_mm inside a compiled CUDA
    graph, against the fp32 eager gather of the same weights."""
    ff = MoEFeedForward(ModelArgs(**GPU_ARGS, n_active_experts=2)).cuda()
    with torch.no_grad():
        ff.gate.weight.normal_(0, 1.0)
        for p in ff.experts.parameters():
            p.normal_(0, 0.1)
    ff_bf16 = MoEFeedForward(ModelArgs(**GPU_ARGS, n_active_experts=2))
    ff_bf16.load_state_dict(ff.state_dict())
    ff_bf16 = ff_bf16.cuda().to(torch.bfloat16)
    x = torch.randn(8, 1, GPU_ARGS["dim"], device="cuda", dtype=torch.bfloat16)
    if not model_module.grouped_mm_available(x, ff_bf16.experts):
        pytest.skip("torch._grouped_mm's bf16 kernel needs sm_90")
    torch._dynamo.reset()
    step = torch.compile(ff_bf16, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        got = step(x).clone()
    want = ff(x.float())
    assert rel_err(got.float(), want) < 2e-2
    # the whole model: compiled CUDA-graph decode on the grouped path = its eager self
    m = on_cuda(random_moe(), torch.bfloat16)
    torch._dynamo.reset()
    assert greedy_tokens(m, GPU_PROMPTS, 20, compile=True) == greedy_tokens(m, GPU_PROMPTS, 20)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_quantized_experts_compiled_equals_eager(mode, tmp_path):
    """int8 / int4 experts: the compiled decode (dequantize fused into the gathered matvec) gives
    the eager tokens. fp32 compute: in bf16 Inductor keeps the fused dequantize in fp32 where eager
    rounds the weight to bf16 first, and on random weights that flips near-tied greedy tokens
    (seen on an H100 for int8); the bf16 path is what scripts/bench.py --suite moe runs."""
    from checkpoint import load_model, save_checkpoint
    from quantize import quantize_checkpoint

    cpu = random_moe()
    save_checkpoint(tmp_path / "fp32", {"model_args": dict(cpu.args.__dict__), "quantization": None}, cpu.state_dict())
    out = quantize_checkpoint(tmp_path / "fp32", mode, 32 if mode == "int4" else None)
    m, _ = load_model(out, "cuda", torch.float32)
    want = greedy_tokens(m, GPU_PROMPTS, 20)
    torch._dynamo.reset()
    assert greedy_tokens(m, GPU_PROMPTS, 20, compile=True) == want


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens,k", [(1, 8), (3, 2)])
def test_gpu_expert_down_mix_equals_reference(tokens, k):
    """gemv.expert_down_mix (the chosen float experts' down projection and routing-weighted sum in
    one kernel, batched decode's path) equals its reference, eager and compiled in a CUDA graph, at a
    width that is not a multiple of its tiles."""
    import gemv as down

    torch.manual_seed(tokens * 10 + k)
    E, D, inter = 16, 300, 700
    h = torch.randn(tokens, k, inter, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(tokens)])
    mix = torch.rand(tokens, k, device="cuda").softmax(-1)
    w2 = torch.randn(E, D, inter, device="cuda", dtype=torch.bfloat16) * 0.05
    want = down.expert_down_mix_reference(h.float(), ids, mix, w2.float())
    compiled = torch.compile(down.expert_down_mix, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out = compiled(h, ids, mix, w2).clone()
    for got in (down.expert_down_mix(h, ids, mix, w2), out):
        assert got.shape == (tokens, D) and got.dtype == torch.bfloat16
        assert rel_err(got.float(), want) < 1e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_route_equals_reference(dtype):
    """gemv.route (the eager PDL block's pick) gives route_reference's pick of the router's decode_gemv
    logits, the same ids and weights, at Qwen3-30B-A3B's and Mixtral's routers and one of 60 experts, for
    one token and for three."""
    import gemv

    for E, k, D, tokens in ((128, 8, 2048, 1), (8, 2, 4096, 1), (60, 3, 100, 3)):
        torch.manual_seed(E)
        w = torch.randn(E, D, device="cuda", dtype=dtype) / 30
        norm_weight = (torch.rand(D, device="cuda") + 0.5).to(dtype)
        xs = [torch.randn(1, D, device="cuda", dtype=dtype) for _ in range(tokens)]
        logits = torch.cat([gemv.decode_gemv(x, w, norm_weight=norm_weight, eps=1e-6) for x in xs])  # [tokens, E]
        weights, ids = gemv.route(logits, k)
        want_weights, want_ids = gemv.route_reference(logits, k)
        assert torch.equal(ids, want_ids) and rel_err(weights, want_weights) < 1e-6


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_gemv_experts_equals_reference(dtype):
    """gemv.decode_gemv_experts (a batch-1 step's experts: one token's, the norm folded into gate/up's
    loads and SiLU(gate) * up into its stores, then the down projection) equals its reference at Qwen3-30B-A3B's shapes
    and one that does not fill its tiles."""
    import gemv

    for E, k, D, inter in ((128, 8, 2048, 768), (6, 2, 100, 70)):
        torch.manual_seed(E)
        x = torch.randn(1, D, device="cuda", dtype=dtype)
        ids = torch.randperm(E, device="cuda")[:k]
        w13 = torch.randn(E, 2 * inter, D, device="cuda", dtype=dtype) / 30
        w2 = torch.randn(E, D, inter, device="cuda", dtype=dtype) / 30
        norm_weight = torch.rand(D, device="cuda", dtype=dtype) + 0.5
        hidden = gemv.decode_gemv_experts(x, ids, w13, norm_weight, eps=1e-6, glu=True)
        want = gemv.decode_gemv_experts_reference(x, ids, w13, norm_weight, eps=1e-6, glu=True)
        assert hidden.shape == (k, inter) and rel_err(hidden.float(), want.float()) < (
            1e-2 if dtype == torch.bfloat16 else 1e-5
        )
        down = gemv.decode_gemv_experts(want, ids, w2)
        want = gemv.decode_gemv_experts_reference(want, ids, w2)
        assert down.shape == (k, D) and rel_err(down.float(), want.float()) < (
            1e-2 if dtype == torch.bfloat16 else 1e-5
        )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens,k,E", [(2, 8, 128), (8, 2, 4), (16, 8, 16)])
def test_gpu_expert_gate_up_equals_reference(tokens, k, E, monkeypatch):
    """gemv.expert_gate_up (the chosen float experts' gate/up grouped by expert, SiLU(gate) * up in the
    epilogue; on by default, FASTGEN_EXPERT_GATE_UP_KERNEL=0 off) equals Experts.hidden, eager and compiled in a CUDA
    graph, with tokens sharing experts and an intermediate size that is not a multiple of its tiles;
    DownMixExperts takes it when it is on."""
    import gemv

    torch.manual_seed(tokens * 10 + k)
    D, inter = 256, 200
    experts = Experts(ModelArgs(dim=D, n_layers=1, n_heads=4, intermediate_size=inter, vocab_size=64,
                                n_experts=E, n_active_experts=k)).cuda()  # fmt: skip
    torch.nn.init.normal_(experts.w13, 0, 0.05)
    x = torch.randn(tokens, D, device="cuda")
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(tokens)])
    with torch.no_grad():
        want = experts.hidden(x, ids)
        w13, xb = experts.w13.to(torch.bfloat16), x.to(torch.bfloat16)
        compiled = torch.compile(gemv.expert_gate_up, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            out = compiled(xb, ids, w13).clone()
        for got in (gemv.expert_gate_up(xb, ids, w13), out):
            assert got.shape == (tokens, k, inter) and got.dtype == torch.bfloat16
            assert rel_err(got.float(), want) < 2e-2
        assert rel_err(gemv.expert_gate_up(x, ids, experts.w13), want) < 1e-5  # fp32: ieee dots
        monkeypatch.setattr(gemv, "EXPERT_GATE_UP_ENABLED", True)
        experts.__class__ = gemv.DownMixExperts
        assert rel_err(experts.hidden(x, ids), want) < 1e-5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens,k", [(1, 2), (1, 8), (8, 2), (16, 8)])
def test_gpu_int8_experts_kernel_equals_dequantized(tokens, k):
    """Int8Experts.gathered on CUDA runs each (token, expert) pair through gemv.int8_expert_gemv;
    it must equal the dequantize-then-matvec path (Experts.gathered), eager and in a CUDA graph."""
    from quantize import Int8Experts

    torch.manual_seed(tokens * 10 + k)
    E, D, inter = 8, 256, 384
    experts = Int8Experts(E, D, inter, "cuda").to(torch.bfloat16)
    for name in ("w13", "w2"):
        getattr(experts, name).copy_(torch.randint(-127, 128, getattr(experts, name).shape))
        getattr(experts, f"{name}_scales").copy_(torch.rand(getattr(experts, f"{name}_scales").shape) / 200)
    x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(tokens)])
    with torch.no_grad():
        fp32 = Int8Experts(E, D, inter, "cuda")  # the same experts in fp32, dequantized in PyTorch ops
        fp32.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in experts.state_dict().items()})
        want = Experts.gathered(fp32, x.float(), ids)
        got = experts.gathered(x, ids)
        assert got.shape == (tokens, k, D) and got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()) < 2e-2
        compiled = torch.compile(experts.gathered, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # warm-up, record, replay
            out = compiled(x, ids).clone()
    assert ((out.float() - want).norm() / want.norm()) < 2e-2


def write_qwen3moe_gguf(hf, path, n_experts=None):
    """llama.cpp's layout of a Qwen3-MoE: stacked blk.N.ffn_*_exps, Q8_0 experts (what the gguf package reads)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    c, sd = hf.config, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in [
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_hidden_layers),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", c.head_dim),
        ("feed_forward_length", c.intermediate_size),
        ("expert_feed_forward_length", c.moe_intermediate_size),
        ("expert_count", n_experts or c.num_experts),
        ("expert_used_count", c.num_experts_per_tok),
        ("context_length", c.max_position_embeddings),
    ]:
        w.add_uint32(f"qwen3moe.{key}", value)
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32("qwen3moe.rope.freq_base", c.rope_parameters["rope_theta"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    hf_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate": "ffn_gate_inp",
    }
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in hf_layer.items()})
    for hf_name, name in names.items():
        w.add_tensor(name, sd[hf_name])
    for i in range(c.num_hidden_layers):
        gate_up, inter = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], c.moe_intermediate_size  # [E, 2I, D]
        down = sd[f"model.layers.{i}.mlp.experts.down_proj"]
        for stacked, name in (
            (gate_up[:, :inter], "ffn_gate_exps"),
            (gate_up[:, inter:], "ffn_up_exps"),
            (down, "ffn_down_exps"),
        ):
            q = quantize(np.ascontiguousarray(stacked), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(f"blk.{i}.{name}.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
def test_gguf_stacked_experts(tmp_path):
    """A Qwen3-MoE GGUF with Q8_0 stacked experts converts to what transformers computes with the
    same dequantized experts; a wrong expert count names the tensor and both counts."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    from scripts.convert_gguf import convert_gguf

    hf = make_hf_moe("qwen3-moe")
    write_qwen3moe_gguf(hf, tmp_path / "m.gguf")
    ours = load_ours(convert_gguf(tmp_path / "m.gguf", tmp_path / "ours"))
    for p_name, p in hf.named_parameters():  # HF with the experts Q8_0 rounds them to
        if ".experts." in p_name:
            p.copy_(
                torch.from_numpy(
                    dequantize(quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
                )
            )
    ids = torch.randint(0, hf.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(4))
    ours.setup_caches(1, PROMPT_LEN)
    assert rel_err(ours(ids, torch.arange(PROMPT_LEN)), hf(ids).logits) < TOL

    write_qwen3moe_gguf(hf, tmp_path / "bad.gguf", n_experts=hf.config.num_experts + 1)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate_inp\.weight holds 8 experts .* says 9"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "bad")
