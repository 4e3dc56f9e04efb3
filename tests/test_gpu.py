"""The GPU tier: `python -m pytest -m gpu` on a CUDA machine (skipped without CUDA).

Small random models made on the fly (head_dim 128 with GQA 4:1, a sliding window, tied
embeddings) prove on the GPU what the CPU tests prove on the CPU: the compiled CUDA-graph decode
gives the greedy tokens of CPU fp32 eager; batches, big caches and chat turns change nothing;
quantized weights and KV caches match their dequantize-then-compute reference; eager GPU runs
never call the compiler; a full cache is a clear error.
"""

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from checkpoint import load_model, model_args_from_dict, read_checkpoint_config, save_checkpoint
from generate import Generator, Sampling, UsageError
from model import ModelArgs, Transformer, offset_length_dense_mask, sdpa_attention_over_cache, valid_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parent.parent
VOCAB = 512
SHAPES = {
    "gqa-hd128": dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128, intermediate_size=512),
    "window": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256, sliding_window=24),
    "tied": dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=1, intermediate_size=256, tie_embeddings=True),
}
# the fused decode block's mixture of experts (its own test only)
MOE_SHAPE = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, n_experts=8, n_active_experts=2)
PROMPTS = [[5, 17, 3, 88, 41, 2, 9, 300, 411, 7], [60, 1, 7], list(range(100, 141)), [12]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles new models: start each from an empty dynamo cache so no test falls
    # back to eager by hitting the recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def random_model(shape: str, seed: int = 0) -> Transformer:
    """A random fp32 model on the CPU whose logits are spread far from ties."""
    torch.manual_seed(seed)
    args = ModelArgs(**(MOE_SHAPE if shape == "moe" else SHAPES[shape]), vocab_size=VOCAB, max_position_embeddings=8192)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1.0)
        if model.output is not None:
            model.output.weight.normal_(0, 1.0)
    return model


def on(model: Transformer, device, dtype=torch.float32) -> Transformer:
    """A copy of `model` on `device` (the caches are made again by setup)."""
    copy = Transformer(model.args).eval()
    copy.load_state_dict(model.state_dict())
    return copy.to(device=device, dtype=dtype)


def greedy(model, prompts, n, max_seq_len, compile=False, kv_cache_dtype=None):
    gen = Generator(model, compile=compile)
    gen.setup(len(prompts), max_seq_len, kv_cache_dtype)
    return gen.generate(prompts, n, Sampling()).tokens


@pytest.mark.parametrize("shape", list(SHAPES))
def test_compiled_cuda_graph_decode_equals_cpu_fp32_eager(shape):
    cpu = random_model(shape)
    want = greedy(cpu, PROMPTS[:3], 40, 128)
    got = greedy(on(cpu, "cuda"), PROMPTS[:3], 40, 128, compile=True)
    assert got == want


def test_compile_blocks_decode_equals_cpu_fp32_eager(monkeypatch):
    """--compile-blocks on CUDA (generate.compile_each_block): each plain TransformerBlock compiled alone,
    called from the eager step that CUDAGraphStep records: a batch of different-length prompts gives the
    CPU fp32 eager tokens, batch 1 too."""
    import gemv

    monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", False)  # plain blocks: the ones compile_each_block compiles
    cpu = random_model("gqa-hd128")
    want = greedy(cpu, PROMPTS[:3], 40, 128)
    cuda = on(cpu, "cuda")
    for prompts, expected in ((PROMPTS[:3], want), (PROMPTS[:1], want[:1])):
        gen = Generator(cuda, compile_blocks=True)
        gen.setup(len(prompts), 128)
        assert gen.generate(prompts, 40, Sampling()).tokens == expected


@pytest.mark.parametrize("split_kv_kernel", [False, True])
def test_compiled_decode_attends_through_flex_or_the_kernel(monkeypatch, split_kv_kernel):
    """--compile's decode steps trace flex_attention (FASTGEN_DECODE_KERNEL=0) or the split-KV kernel
    (the default), both of which skip unwritten cache blocks, never the dense SDPA path: torch 2.11
    reports is_exporting() under torch.compile on CUDA, and while the model asked it, every compiled
    step attended over the whole cache with a dense mask."""
    import kv_attention
    import model as model_module

    traced = []

    def recording(name):
        real = getattr(model_module, name)
        return lambda *args, **kwargs: traced.append(name) or real(*args, **kwargs)

    for name in ("flex_attention_over_cache", "cache_attention_at_decode"):
        monkeypatch.setattr(model_module, name, recording(name))
    monkeypatch.setattr(kv_attention, "UNQUANTIZED_ENABLED", split_kv_kernel)
    greedy(on(random_model("gqa-hd128"), "cuda", torch.bfloat16), PROMPTS[:1], 4, 64, compile=True)
    want = "cache_attention_at_decode" if split_kv_kernel else "flex_attention_over_cache"
    assert want in traced


@pytest.mark.parametrize("options", [{"SPLIT_KV": 1}, {"SPLIT_KV": 4}])
def test_flex_decode_options_keep_the_tokens(options):
    """The flex-decoding options profile_decode.py --flex-decode-options measures compile on CUDA and
    give CPU fp32 eager's tokens (a 6000-slot cache: the splits see different blocks)."""
    cpu = random_model("gqa-hd128")
    want = greedy(cpu, PROMPTS[:3], 30, 6000)
    cuda = on(cpu, "cuda")
    cuda.flex_decode_options = options
    assert greedy(cuda, PROMPTS[:3], 30, 6000, compile=True) == want


@pytest.mark.parametrize("shape", ["gqa-hd128", "window"])
def test_batch_of_different_lengths_equals_each_alone_compiled(shape):
    model = on(random_model(shape), "cuda")
    batch = greedy(model, PROMPTS, 30, 128, compile=True)
    for b, p in enumerate(PROMPTS):
        assert batch[b] == greedy(model, [p], 30, 128, compile=True)[0], f"row {b}"


@pytest.mark.parametrize("shape", ["gqa-hd128", "window"])
def test_cache_of_thousands_of_slots_equals_just_enough(shape):
    model = on(random_model(shape), "cuda")
    p = PROMPTS[2]
    just = greedy(model, [p], 50, len(p) + 50, compile=True)
    big = greedy(model, [p], 50, 6000, compile=True)
    assert big == just


def test_chat_turns_through_the_compiled_step_equal_a_rerun_from_empty():
    """Three turns held in the cache (continue_sequence, as generate.py --chat does) against each
    transcript re-run from an empty cache."""
    model = on(random_model("gqa-hd128"), "cuda")
    gen = Generator(model, compile=True)
    gen.setup(1, 512)
    transcript = []
    for turn in ([5, 6, 7, 8], [100, 101], [300, 301, 302, 303, 304]):
        res = gen.generate([turn], 20, Sampling(), continue_sequence=True)  # the Generator holds the place
        transcript += turn
        rerun = greedy(model, [transcript], 20, 512, compile=True)
        assert res.tokens == rerun
        transcript += res.tokens[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_gpu_path_never_compiles(monkeypatch, dtype):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called on the eager path")

    monkeypatch.setattr(torch, "compile", no_compile)
    frames_before = dict(torch._dynamo.utils.counters["frames"])
    cpu = random_model("gqa-hd128")
    got = greedy(on(cpu, "cuda", dtype), PROMPTS[:3], 20, 64)
    assert dict(torch._dynamo.utils.counters["frames"]) == frames_before
    if dtype == torch.float32:
        assert got == greedy(cpu, PROMPTS[:3], 20, 64)


def test_eager_cuda_graph_step_samples_and_rerecords():
    """The eager step's CUDA graph follows a new batch size, cache and sampling settings."""
    model = on(random_model("window"), "cuda", torch.bfloat16)
    gen = Generator(model)
    gen.setup(1, 64)
    one = gen.generate([PROMPTS[0]], 20, Sampling()).tokens
    gen.setup(3, 200)  # new cache buffers: recorded again
    three = gen.generate(PROMPTS[:3], 20, Sampling()).tokens
    assert three[0] == one[0]
    torch.manual_seed(0)
    sampled = gen.generate(PROMPTS[:3], 20, Sampling(temperature=1.0, top_k=50)).tokens
    assert all(len(row) == 20 and all(0 <= t < VOCAB for t in row) for row in sampled)
    assert sampled != three  # temperature 1 over spread logits: not the greedy path


def test_cuda_graph_step_runs_a_step_twice_before_capture():
    """CUDAGraphStep runs the step twice before it captures: a compiled step whose second call recompiles (a guard
    on Python state its first call changed) must compile and autotune outside the capture, where a host sync
    breaks it. Stood in for here by a step that syncs on its second call; replays then give the step's result."""
    from generate import CUDAGraphStep

    calls = []

    def step(model, x):
        calls.append(1)
        if len(calls) == 2:
            x.sum().item()  # a host sync: inside a capture, cudaErrorStreamCaptureUnsupported
        return x * 2

    model = on(random_model("tied"), "cuda", torch.bfloat16)
    model.setup_caches(1, 16)
    graph_step = CUDAGraphStep(step)
    x = torch.arange(4.0, device="cuda")
    assert graph_step(model, x).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert graph_step(model, x + 1).tolist() == [2.0, 4.0, 6.0, 8.0]  # replayed, not run again
    assert len(calls) == 3  # two plain runs and the capture


def host_ops_of_16_more_steps(gen: Generator) -> dict:
    """The host's torch ops (name -> count) that a generate() of 24 new tokens runs beyond one of 8."""

    def ops_of(new_tokens):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gen.generate([PROMPTS[0]], new_tokens, Sampling())
        return {e.key: e.count for e in prof.key_averages()}

    short, long = ops_of(8), ops_of(24)
    return {op: long[op] - short.get(op, 0) for op in long if long[op] != short.get(op, 0)}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_decode_loop_replays_with_nothing_between_replays(monkeypatch, compile):
    """The decode loop hands each CUDA-graph replay its own input buffers back (generate.advancing): between
    replays the host queues only the token's copy to the host, no input copies, clone or increment (each a
    small kernel the GPU runs before the next replay); the reads by copy (FASTGEN_TOKEN_LOG=0), as the token log's
    test below has not even the copy."""
    import generate

    monkeypatch.setattr(generate, "TOKEN_LOG", False)
    model = on(random_model("tied"), "cuda", torch.bfloat16)
    gen = Generator(model, compile=compile)
    gen.setup(1, 128)
    gen.generate([PROMPTS[0]], 24, Sampling())  # records (and compiles)
    per_16_steps = host_ops_of_16_more_steps(gen)
    # 16 more steps: 16 replays, each followed by its token's copy to the host and nothing else
    assert per_16_steps.get("aten::copy_") == 16 and "aten::clone" not in per_16_steps, per_16_steps
    assert "aten::add_" not in per_16_steps and "aten::add" not in per_16_steps, per_16_steps


@pytest.mark.parametrize("compile", [False, True], ids=["cuda-graph", "compiled"])
def test_token_log_decodes_like_cpu_with_nothing_between_replays(monkeypatch, compile):
    """generate.TOKEN_LOG (the default, issue 11): each step's graph writes its token ids into pinned host memory
    mapped into the GPU's address space, and the host reads them there: the greedy tokens of CPU fp32 eager, and
    between two replays the host queues nothing at all (no copy to the host, no event)."""
    import generate

    cpu = random_model("tied")
    want = greedy(cpu, PROMPTS[:3], 40, 128)
    monkeypatch.setattr(generate, "TOKEN_LOG", True)
    model = on(cpu, "cuda")
    assert greedy(model, PROMPTS[:3], 40, 128, compile=compile) == want
    assert model.token_log.is_cuda and model.token_log.data_ptr() == model.token_log.owner.data_ptr()
    gen = Generator(model, compile=compile)
    gen.setup(1, 128)
    assert gen.generate([PROMPTS[0]], 24, Sampling()).tokens == [want[0][:24]]
    per_16_steps = host_ops_of_16_more_steps(gen)
    assert "aten::copy_" not in per_16_steps and "aten::clone" not in per_16_steps, per_16_steps
    del model.token_log


@pytest.mark.parametrize("q_len", [1, 40])  # decode (plain matmuls on CUDA) and prefill (fused SDPA)
def test_eager_attention_on_cuda_equals_sliced_sdpa(q_len):
    from test_attention import FilledCache, sdpa_reference, valid_pairs

    torch.manual_seed(q_len)
    starts, q_start, kv_len, window = [0, 5, 130], 200, 512, None
    B, Hq, Hkv, D = len(starts), 8, 2, 128
    q, k, v = torch.randn(B, Hq, q_len, D), torch.randn(B, Hkv, kv_len, D) * 3, torch.randn(B, Hkv, kv_len, D)
    start = torch.tensor(starts, dtype=torch.int32)
    want = sdpa_reference(q, k, v, start, q_start, window)
    mask = offset_length_dense_mask(start.cuda(), torch.tensor(q_start).cuda(), q_len, kv_len, window)
    cache = FilledCache(k.cuda(), v.cuda())
    got = sdpa_attention_over_cache(q.cuda(), cache, mask.repeat(1, 1, Hq // Hkv, 1)).cpu()
    real = valid_pairs(start, q_start, q_len, kv_len, window).any(-1)
    err = (got - want).transpose(1, 2)[real].norm() / want.transpose(1, 2)[real].norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("kv_cache_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_kv_cache_on_cuda_equals_cpu_reference(kv_cache_dtype):
    """The dequantize-then-compute reference is the same cache on the CPU, in fp32, eager."""
    cpu = random_model("gqa-hd128")
    want = greedy(cpu, PROMPTS[:3], 30, 128, kv_cache_dtype=kv_cache_dtype)
    cuda = on(cpu, "cuda")
    assert greedy(cuda, PROMPTS[:3], 30, 128, kv_cache_dtype=kv_cache_dtype) == want
    assert greedy(cuda, PROMPTS[:3], 30, 128, compile=True, kv_cache_dtype=kv_cache_dtype) == want


# ----------------------------------------------------------------------------- quantized KV attention

KV_KERNEL_CASES = [  # B, Hq, Hkv, D, cache slots, query slot, row starts, window
    (1, 32, 8, 128, 80, 16, [0], None),
    (3, 8, 2, 64, 2048, 700, [0, 17, 650], None),
    (2, 4, 2, 80, 384, 300, [3, 0], 24),
    (2, 8, 8, 64, 8192, 8000, [0, 7000], None),
    (2, 8, 2, 64, 50, 40, [0, 9], None),  # one tile: one split, no merge
    (32, 32, 16, 64, 300, 250, [0, 5] * 16, None),  # 512 (row, kv head) programs: one split, no merge
]


def nan_outside_rows(tensors, row_start, slot, window):
    """Copies of [B, H, S, X] tensors with NaN at every slot outside each row's valid range: a kernel
    that reads one spreads NaN into its output."""
    B, S = tensors[0].shape[0], tensors[0].shape[2]
    slots = torch.arange(S, device=tensors[0].device).view(1, S)
    outside = ~valid_kv(row_start.view(B, 1), slot.view(1, 1), slots, window).view(B, 1, S, 1)
    return [t.masked_fill(outside, float("nan")) for t in tensors]


def quantized_attention_case(case, storage, dtype, q_size, scale_ranges):
    """One KV_KERNEL_CASES case over an int8 / fp8 cache: (the kernel's arguments, with NaN scales at
    every slot outside a row's valid range, and the reference's output). q ~ N(0, q_size); each cache's
    scales uniform in [low, low + width) for its (low, width) (K's, then V's)."""
    import kv_attention

    B, Hq, Hkv, D, S, q_slot, starts, window = case
    torch.manual_seed(S + D)
    store = torch.int8 if storage == "int8" else torch.float8_e4m3fn
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype) * q_size
    caches = [(torch.randn(B, Hkv, S, D, device="cuda") * 60).clamp(-127, 127).to(store) for _ in range(2)]
    scales = [(torch.rand(B, Hkv, S, 1, device="cuda") * width + low).to(dtype) for low, width in scale_ranges]
    row_start = torch.tensor(starts, dtype=torch.int32, device="cuda")
    slot = torch.tensor([q_slot], device="cuda")
    want = kv_attention.quantized_decode_attention_reference(
        q, caches[0], scales[0], caches[1], scales[1], row_start, slot, window
    )
    poisoned = nan_outside_rows(scales, row_start, slot, window)
    return (q, caches[0], poisoned[0], caches[1], poisoned[1], row_start, slot, window or 0), want


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", KV_KERNEL_CASES)
def test_quantized_decode_attention_kernel_equals_reference(storage, dtype, case):
    """kv_attention's kernel against its dequantize-then-SDPA reference, and it never reads a slot
    outside a row's valid range: there the scales are NaN, which any read would spread."""
    import kv_attention

    args, want = quantized_attention_case(case, storage, dtype, 1, ((1e-3, 1 / 50), (1e-3, 1 / 50)))
    got = kv_attention.quantized_decode_attention(*args)
    assert got.dtype == dtype and got.shape == want.shape
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


@pytest.mark.parametrize("single_split_tiles", [0, 8], ids=["splits", "one-split-up-to-8-tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", KV_KERNEL_CASES)
def test_unquantized_decode_attention_kernel_equals_reference(dtype, case, single_split_tiles, monkeypatch):
    """The same kernel over a bf16/fp16/fp32 cache (kv_attention.decode_attention, SplitKVCache):
    equal to the dense reference, and K/V outside each row's valid range (NaN here) are never read; with
    SINGLE_SPLIT_MAX_TILES 8 the caches of up to 8 tiles attend in one split (no merge), the others as before."""
    import kv_attention

    monkeypatch.setattr(kv_attention, "SINGLE_SPLIT_MAX_TILES", single_split_tiles)

    B, Hq, Hkv, D, S, q_slot, starts, window = case
    torch.manual_seed(S + D)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    caches = [torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype) for _ in range(2)]
    row_start = torch.tensor(starts, dtype=torch.int32, device="cuda")
    slot = torch.tensor([q_slot], device="cuda")
    want = kv_attention.quantized_decode_attention_reference(
        q, caches[0], None, caches[1], None, row_start, slot, window
    )
    poisoned = nan_outside_rows(caches, row_start, slot, window)
    args = (q, poisoned[0], poisoned[1], row_start, slot, window or 0)
    got = kv_attention.decode_attention(*args)
    assert got.dtype == dtype and got.shape == want.shape
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_one_split_decode_attention_compiles_to_its_kernel_alone():
    """Under torch.compile a one-split decode attention (the batch-1 step at short context) is its kernel and
    nothing else: the kernel stores no partials at SPLITS 1, so the compiler copies nothing into the unused partial
    arguments (a kernel a layer, 1.7 us each in the H100's int4 step, while the stores sat after a return)."""
    from torch._inductor.utils import run_and_get_code

    import kv_attention

    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    caches = [torch.randn(1, 8, 64, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    row_start, slot = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.tensor([40], device="cuda")
    assert kv_attention.num_splits(1, 8, 64, kv_attention.TARGET_PROGRAMS) == 1
    attend = torch.compile(lambda q: kv_attention.decode_attention(q, *caches, row_start, slot, 0), fullgraph=True)
    got, (code,) = run_and_get_code(attend, q)
    want = kv_attention.quantized_decode_attention_reference(q, caches[0], None, caches[1], None, row_start, slot, None)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    launched = re.findall(r"(\w+)\.run\(", code)  # the kernels call() launches
    assert len(launched) == 1 and "decode" in launched[0], launched


@pytest.mark.parametrize("case", KV_KERNEL_CASES)
def test_fp8_tiles_via_fp32_equal_tritons_conversion(case, monkeypatch):
    """KV_FP8_VIA_F32 (the default): an fp8 cache's tiles converted to bf16 through fp32 (PTX: cvt to fp16 pairs,
    to fp32, the top halves) give Triton's own conversion's output, which converts the same values exactly another
    way, over random tiles and over tiles holding every e4m3 byte (subnormals, the largest, both zeros), and the
    reference."""
    import kv_attention

    args, want = quantized_attention_case(case, "fp8", torch.bfloat16, 1, ((1e-3, 1 / 50), (1e-3, 1 / 50)))
    every_byte = torch.arange(args[1].numel(), device="cuda").remainder(256).to(torch.uint8).view(args[1].shape)
    every_byte[(every_byte & 0x7F) == 0x7F] = 0  # e4m3fn's two NaNs
    for k_cache, v_cache in (
        (args[1], args[3]),
        (every_byte.view(torch.float8_e4m3fn), every_byte.flip(-1).view(torch.float8_e4m3fn)),
    ):
        inputs = (args[0], k_cache, args[2], v_cache, *args[4:])
        monkeypatch.setattr(kv_attention, "KV_FP8_VIA_F32", False)
        triton_form = kv_attention.quantized_decode_attention(*inputs)
        monkeypatch.setattr(kv_attention, "KV_FP8_VIA_F32", True)
        got = kv_attention.quantized_decode_attention(*inputs)
        assert got.dtype == torch.bfloat16 and got.shape == triton_form.shape
        assert ((got.float() - triton_form.float()).norm() / triton_form.float().norm()).item() < 1e-5
    got = kv_attention.quantized_decode_attention(*args)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_split_kv_cache_decodes_like_the_flex_path(monkeypatch):
    """The default bf16 cache on CUDA (kv_attention.SplitKVCache) decodes a batch of different-length
    prompts to the tokens of the plain KVCache, eager and compiled (fp32, so no near-ties flip)."""
    import kv_attention

    cuda = on(random_model("gqa-hd128"), "cuda", torch.float32)
    want = greedy(cuda, PROMPTS[:3], 20, 128)
    monkeypatch.setattr(kv_attention, "UNQUANTIZED_ENABLED", True)
    monkeypatch.setattr(kv_attention, "SINGLE_SPLIT_MAX_TILES", 0)  # these 4-tile caches split (and merge)
    for compile, max_seq_len in ((False, 144), (True, 160)):  # a new length makes setup() remake the caches
        assert greedy(cuda, PROMPTS[:3], 20, max_seq_len, compile=compile) == want
        assert isinstance(cuda.layers[0].attention.kv_cache, kv_attention.SplitKVCache)


def test_quantized_kv_decode_uses_the_kernel_compiled_and_eager(monkeypatch):
    """With the kernel on, an int8 cache at decode on CUDA attends through kv_attention (not a
    dequantized copy), in the compiled step and in the eager CUDA-graph step alike, and a batch of
    different-length prompts decodes to the tokens of the dequantized path."""
    import kv_attention
    import model as model_module

    # a set, not a list: Dynamo guards on a list's length, so appending under torch.compile
    # recompiled every step until the recompile limit; adding the same element again changes nothing
    calls = set()
    real = model_module.cache_attention_at_decode

    def recording(*args, **kwargs):
        calls.add("kernel path")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "cache_attention_at_decode", recording)
    monkeypatch.setattr(kv_attention, "ENABLED", False)  # the dequantized path, for the reference tokens
    cuda = on(random_model("gqa-hd128"), "cuda")
    want = greedy(cuda, PROMPTS[:3], 20, 128, kv_cache_dtype=torch.int8)  # kernel off: dequantized cache
    assert not calls
    monkeypatch.setattr(kv_attention, "ENABLED", True)
    for compile in (False, True):
        calls.clear()
        assert greedy(cuda, PROMPTS[:3], 20, 128, compile=compile, kv_cache_dtype=torch.int8) == want
        assert calls


# ----------------------------------------------------------------------------- quantized weights


@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 576), (520, 1300), (64, 8200)])
def test_int8_decode_gemv_equals_reference(n, k):
    """One row through an int8 weight: decode_gemv (Int8Linear's batch-1 path), eager and replayed."""
    import gemv

    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scales = torch.rand(n, device="cuda") / 100
    got = gemv.decode_gemv(x, w, scales)
    want = gemv.int8_gemv_reference(x, w, scales)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    compiled = torch.compile(gemv.decode_gemv, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out = compiled(x, w, scales).clone()
    assert torch.equal(out, got)


@pytest.mark.parametrize("rows,n,k", [(8, 4096, 4096), (5, 1000, 576), (2, 520, 1300), (16, 64, 8200)])
def test_int8_multi_row_kernels_equal_reference(rows, n, k):
    """Batched decode's int8 linear (2-16 rows: gemv.int8_gemm_few_rows, tensor cores split over K)
    equals the reference, at the sweep's tile sizes, at an odd split count, and through Int8Linear
    eager and compiled (so the triton_op is what runs, not the converted-bf16 fallback)."""
    import gemv
    import quantize

    torch.manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scales = torch.rand(n, device="cuda") / 100
    want = gemv.int8_gemv_reference(x, w, scales).float()
    linear = quantize.Int8Linear(k, n, device="cuda")
    linear.weight.copy_(w)
    linear.scales.copy_(scales)
    x3 = x.view(rows, 1, k)  # decode's [B, 1, K]
    got_all = [gemv.int8_gemm_dot(x, w, scales, SPLITS=3), gemv.int8_gemm_few_rows(x, w, scales)]
    got_all += [linear(x3).view(rows, n), torch.compile(linear, fullgraph=True)(x3).view(rows, n)]
    for got in got_all:
        assert ((got.float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("n,k", [(960, 576), (1000, 4100), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_gemv_equals_linear(n, k, dtype, monkeypatch):
    """gemv.decode_gemv (a batch-1 step's float linears) gives F.linear, at shapes that do not fill
    its tiles; DecodeLinear takes it for one row, eager and compiled, and keeps nn.Linear (cuBLAS)
    for more rows; use_decode_kernels gives the class to a model's float linears."""
    import gemv

    torch.manual_seed(n)
    linear = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=dtype).requires_grad_(False)  # no autograd formula
    x = torch.randn(1, 1, k, device="cuda", dtype=dtype)
    want = torch.nn.functional.linear(x, linear.weight, linear.bias).float()
    got = gemv.decode_gemv(x.view(1, k), linear.weight)
    assert got.dtype == dtype and got.shape == (1, n)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((got.float() + linear.bias.float() - want).norm() / want.norm()) < tol
    linear.__class__ = gemv.DecodeLinear
    monkeypatch.setattr(gemv, "FLOAT_GEMV_ENABLED", True)  # the default; FASTGEN_FLOAT_GEMV=0 may have unset it
    for out in (linear(x), torch.compile(linear, fullgraph=True)(x)):
        assert out.shape == (1, 1, n) and ((out.float() - want).norm() / want.norm()) < tol
    x4 = torch.randn(4, 1, k, device="cuda", dtype=dtype)
    assert torch.equal(linear(x4), torch.nn.functional.linear(x4, linear.weight, linear.bias))
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, intermediate_size=96, vocab_size=100)).cuda()
    gemv.use_decode_kernels(model)
    assert type(model.output) is gemv.DecodeLinear and type(model.layers[0].attention.wqkv) is gemv.DecodeLinear


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("norm, glu, residual", [(True, False, False), (True, True, False), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_gemv_folded_parts_equal_reference(norm, glu, residual, dtype, int8):
    """decode_gemv with the RMSNorm, SiLU(gate) * up of w13's two halves and the residual folded in
    (DecodeBlock's calls), over a float or an int8 weight, equals decode_gemv_reference, at SmolLM2's
    w13 / w2 shapes, one with K > 4096 and one whose halves do not fill a tile."""
    import gemv

    for n, k in ((3072, 576), (576, 1536), (300, 5000), (70, 100)):
        torch.manual_seed(n)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) / 30
        if int8:
            w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        extra = dict(
            scales=torch.rand(n, device="cuda") / 3000 if int8 else None,
            norm_weight=torch.rand(k, device="cuda", dtype=dtype) + 0.5 if norm else None,
            residual=torch.randn(1, n, device="cuda", dtype=dtype) if residual else None,
            eps=1e-5 if norm else 0.0,
            glu=glu,
        )
        want = gemv.decode_gemv_reference(x, w, **extra).float()
        got = gemv.decode_gemv(x, w, **extra)
        assert (
            got.shape == (1, n // 2 if glu else n)
            and got.dtype == dtype
            and ((got.float() - want).norm() / want.norm()) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
        )


def one_token_qkv(D, n_heads, n_kv_heads, qk_norm, slots, dtype):
    """A token's wqkv output, its RoPE angles, the q/k norm weights (or None) and two caches of `slots`."""
    qkv = torch.randn(1, (n_heads + 2 * n_kv_heads) * D, device="cuda", dtype=dtype)
    angles = torch.rand(D // 2, device="cuda") * 6
    cos, sin = torch.cat((angles, angles)).cos().to(dtype), torch.cat((angles, angles)).sin().to(dtype)
    norms = [torch.rand(D, device="cuda", dtype=dtype) + 0.5 if qk_norm else None for _ in range(2)]
    caches = [torch.randn(1, n_kv_heads, slots, D, device="cuda", dtype=dtype) for _ in range(2)]
    return qkv, cos, sin, norms, caches


def assert_written_at(caches, want_caches, slot, tol):
    """The caches equal the reference's: the token's k, v at slot (within tol), every other slot untouched."""
    for c, w in zip(caches, want_caches):
        assert torch.equal(c[:, :, :slot], w[:, :, :slot]) and torch.equal(c[:, :, slot + 1 :], w[:, :, slot + 1 :])
        assert ((c[:, :, slot].float() - w[:, :, slot].float()).norm() / w[:, :, slot].float().norm()) < tol


@pytest.mark.parametrize("D, n_heads, n_kv_heads, qk_norm", [(64, 9, 3, False), (128, 32, 4, True), (96, 4, 4, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_write_kv_equals_reference(D, n_heads, n_kv_heads, qk_norm, dtype):
    """kv_attention.rope_write_kv (DecodeBlock's one kernel for the query/key norms, RoPE and the
    cache write) returns the reference's q and writes the reference's k, v at the slot, nothing else."""
    import kv_attention

    torch.manual_seed(D)
    qkv, cos, sin, norms, caches = one_token_qkv(D, n_heads, n_kv_heads, qk_norm, 40, dtype)
    want_caches = [c.clone() for c in caches]
    slot = torch.tensor([29], device="cuda")
    want = kv_attention.rope_write_kv_reference(qkv, cos, sin, *want_caches, slot, n_heads, *norms, 1e-6)
    got = kv_attention.rope_write_kv(qkv, cos, sin, *caches, slot, n_heads, *norms, 1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert got.shape == (1, n_heads, 1, D) and ((got.float() - want.float()).norm() / want.float().norm()) < tol
    assert_written_at(caches, want_caches, 29, tol)


@pytest.mark.parametrize("D, n_heads, n_kv_heads", [(64, 9, 3), (128, 32, 8), (96, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("int8, bias", [(False, False), (False, True), (True, False)], ids=["float", "bias", "int8"])
def test_decode_gemv_rope_kv_equals_reference(D, n_heads, n_kv_heads, dtype, int8, bias):
    """gemv.decode_gemv_rope_kv (ROPE_IN_QKV: wqkv's GEMV, its norm folded in, with RoPE and the cache
    write in its epilogue) returns decode_gemv then rope_write_kv's reference q and writes their k, v at
    the slot and nothing else: SmolLM2's, Llama-3-8B's (int8 too) and an odd head dim's heads."""
    import gemv

    torch.manual_seed(D)
    K = 1100
    N = (n_heads + 2 * n_kv_heads) * D
    _, cos, sin, _, caches = one_token_qkv(D, n_heads, n_kv_heads, False, 40, dtype)
    x = torch.randn(1, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / 30
    scales = None
    if int8:
        w, scales = (
            torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8),
            torch.rand(N, device="cuda") / 3000,
        )
    norm_weight = torch.rand(K, device="cuda", dtype=dtype) + 0.5
    b = torch.randn(1, N, device="cuda", dtype=dtype) if bias else None
    want_caches = [c.clone() for c in caches]
    slot = torch.tensor([29], device="cuda")
    want = gemv.decode_gemv_rope_kv_reference(x, w, scales, norm_weight, b, 1e-5, cos, sin, *want_caches, slot, n_heads)
    got = gemv.decode_gemv_rope_kv(x, w, scales, norm_weight, b, 1e-5, cos, sin, *caches, slot, n_heads)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert got.shape == (1, n_heads, 1, D) and ((got.float() - want.float()).norm() / want.float().norm()) < tol
    assert_written_at(caches, want_caches, 29, tol)


def launched_with_pdl(kernel) -> list[bool]:
    """Each compiled variant of a Triton kernel in Triton's cache: was it built for a PDL launch?"""
    return [k.metadata.launch_pdl for cache in kernel.device_caches.values() for k in cache[0].values()]


@pytest.mark.parametrize(
    "shape, split, pdl, compile",
    [
        ("gqa-hd128", False, False, True),
        ("window", False, False, True),
        ("tied", False, False, True),
        ("gqa-hd128", True, False, True),
        ("window", True, False, True),
        ("gqa-hd128", False, True, False),
        ("window", True, True, False),
        ("tied", False, True, False),
        ("gqa-hd128", True, True, True),
        ("moe", False, False, False),
        ("moe", False, True, False),
        ("moe", False, True, True),
    ],
)
def test_fused_decode_block_equals_cpu_fp32_eager(monkeypatch, shape, split, pdl, compile):
    """The fused decode block (these models are narrower than FUSED_FLOAT_MAX_DIM; DecodeLinear for the
    output projection): the CUDA-graph decode of a batch-1 prompt through gemv.DecodeBlock gives the CPU
    fp32 eager tokens, and a batch still decodes through the plain blocks to the same tokens.
    split: the 2-tile caches attended in splits and merged (SINGLE_SPLIT_MAX_TILES 0, as the default 1 does; else
    one split, SINGLE_SPLIT_MAX_TILES 4).
    pdl: kv_attention.PDL, each kernel of the chain launched to start while the one before it finishes and
    waiting for it in-kernel, and really launched that way: eager (generate.py without --compile) and
    compiled around the blocks (--compile with PDL: the blocks run eager inside the step's one CUDA graph).
    moe: eager, a mixture of experts' block picks with gemv.route and mixes with gemv.expert_down_mix."""
    import gemv
    import kv_attention

    monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", True)
    monkeypatch.setattr(gemv, "FLOAT_GEMV_ENABLED", True)
    monkeypatch.setattr(kv_attention, "SINGLE_SPLIT_MAX_TILES", 0 if split else 4)
    monkeypatch.setattr(kv_attention, "PDL", pdl)
    cpu = random_model(shape)
    want = [greedy(cpu, [p], 40, 128)[0] for p in PROMPTS[:2]]
    cuda = on(cpu, "cuda")
    assert [greedy(cuda, [p], 40, 128, compile=compile)[0] for p in PROMPTS[:2]] == want
    assert type(cuda.layers[0]) is gemv.DecodeBlock
    assert cuda.output is None or type(cuda.output) is gemv.DecodeLinear  # tied: the embedding's matmul
    assert greedy(cuda, PROMPTS[:2], 40, 128, compile=compile) == want
    if pdl:
        kernels = [gemv._decode_gemv_kernel, kv_attention._quantized_decode_kernel]
        # RoPE and the cache write: wqkv's epilogue for these float blocks (ROPE_IN_QKV "float", the default),
        # else their own kernel
        rope_in_qkv = gemv.ROPE_IN_QKV != "0" and cuda.layers[0].attention.q_norm is None
        kernels += [] if rope_in_qkv else [kv_attention._rope_write_kv_kernel]
        kernels += [gemv._route_kernel, gemv._expert_down_mix_kernel] if shape == "moe" else []
        kernels += [kv_attention._merge_splits_kernel] if split else []
        for kernel in kernels:
            assert any(launched_with_pdl(kernel)), kernel


@pytest.mark.parametrize(
    "shape, pdl, compile",
    [
        ("gqa-hd128", False, False),
        ("gqa-hd128", False, True),
        ("window", True, True),
        ("tied", True, False),
        ("moe", True, True),
    ],
)
def test_opt_in_decode_folds_equal_cpu_fp32_eager(monkeypatch, shape, pdl, compile):
    """With gemv.ROPE_IN_QKV (RoPE and the cache write in wqkv's epilogue: decode_gemv_rope_kv, no
    rope_write_kv) and kv_attention.SINGLE_SPLIT_MAX_TILES (the 128-slot cache, 2 tiles, attended in one
    split: no merge) the fused decode block's CUDA-graph decode gives the CPU fp32 eager tokens, eager,
    compiled, and compiled around the blocks with PDL; eager, every layer's step calls decode_gemv_rope_kv."""
    import gemv
    import kv_attention

    monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", True)
    monkeypatch.setattr(gemv, "ROPE_IN_QKV", "1")
    monkeypatch.setattr(kv_attention, "SINGLE_SPLIT_MAX_TILES", 4)
    monkeypatch.setattr(kv_attention, "PDL", pdl)
    calls = []
    if not compile:  # counted only eager: a count appended inside a traced step would recompile it every step
        op = gemv.decode_gemv_rope_kv
        monkeypatch.setattr(gemv, "decode_gemv_rope_kv", lambda *args: calls.append(1) or op(*args))
    cpu = random_model(shape)
    want = [greedy(cpu, [p], 40, 128)[0] for p in PROMPTS[:2]]
    cuda = on(cpu, "cuda")
    assert [greedy(cuda, [p], 40, 128, compile=compile)[0] for p in PROMPTS[:2]] == want
    assert type(cuda.layers[0]) is gemv.DecodeBlock
    assert compile or len(calls) >= cuda.args.n_layers  # each layer's step (recorded into a CUDA graph, replayed)


@pytest.mark.parametrize("pdl, rope_in_qkv", [(False, False), (True, False), (True, True)])
def test_fused_decode_block_over_int8_weights_keeps_the_tokens(monkeypatch, pdl, rope_in_qkv):
    """An int8-quantized model's compiled batch-1 decode gives the same tokens through DecodeBlock
    (the default for int8 blocks: decode_gemv over the int8 weights and scales) as through Int8Linear.
    pdl False: torch.compile(mode="reduce-overhead", fullgraph=True), what a GPU before sm_90 runs (issue
    10 wants int8 to compile so); True: the blocks eager inside our CUDA graph (the default on sm_90+).
    rope_in_qkv: gemv.ROPE_IN_QKV, RoPE and the cache write in the int8 wqkv's epilogue."""
    import gemv
    import kv_attention
    import quantize

    monkeypatch.setattr(kv_attention, "PDL", pdl)
    monkeypatch.setattr(gemv, "ROPE_IN_QKV", "1" if rope_in_qkv else "0")

    cpu = random_model("gqa-hd128")
    floats = {name: m.weight.detach() for name, m in quantize.quantizable_linears(cpu)}
    quantize.apply_quantization(cpu, {"mode": "int8"})
    for name, weight in floats.items():
        linear = cpu.get_submodule(name)
        linear.weight, linear.scales = quantize.quantize_int8(weight)
    monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", False)  # fused by default since 2026-12-04: off for want
    want = [greedy(cpu.cuda(), [p], 40, 128, compile=True)[0] for p in PROMPTS[:2]]
    torch._dynamo.reset()
    monkeypatch.setattr(gemv, "FUSED_DECODE_ENABLED", True)
    got = [greedy(cpu, [p], 40, 128, compile=True)[0] for p in PROMPTS[:2]]
    assert type(cpu.layers[0]) is gemv.DecodeBlock and got == want


@pytest.mark.parametrize("convert", [0, 1, 2])
def test_int8_gemv_conversions_are_exact(convert):
    """Each int8 -> fp32 form of the GEMV (cvt, the 2^23 trick, prmt) reads every byte value at
    every position of its 32-bit word exactly: a one-hot x picks column j, so y = W[:, j] exactly."""
    import gemv

    n, k = 256, 2048
    w = ((torch.arange(n).view(-1, 1) + torch.arange(k).view(1, -1)) % 256 - 128).to(torch.int8).cuda()
    columns = [0, 1, 2, 3, 6, 1029, 2047]
    x = torch.zeros(len(columns), k, device="cuda", dtype=torch.bfloat16)
    x[range(len(columns)), columns] = 1.0
    scales = torch.ones(n, device="cuda")
    for block_k in (512, 1024):
        for row, column in enumerate(columns):
            tiles = {"CONVERT": convert, "BLOCK_K": block_k}
            y = gemv._decode_gemv_launch(x[row : row + 1], w, None, scales, None, None, 0.0, False, tiles)
            assert torch.equal(y[0].float(), w[:, column].float())


@pytest.mark.parametrize("n,k,inner_k_tiles", [(64, 4096, 8), (24, 576, 4), (16, 96, 2)])
def test_int4_tinygemm_layout_is_torchs(n, k, inner_k_tiles):
    """gemv.int4_tinygemm_layout (how int4_mma_probe.py's layout check reads tinygemm's CUDA layout) is
    torch's own packing, word for word."""
    import gemv

    torch.manual_seed(n + k)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    want = torch.ops.aten._convert_weight_to_int4pack(packed.cuda(), inner_k_tiles).cpu()
    assert torch.equal(gemv.int4_tinygemm_layout(packed, inner_k_tiles), want)


def random_int4_linear(n: int, k: int, groupsize: int):
    """An Int4Linear [n, k] of random quantized weights packed for CUDA, and one bf16 row for it."""
    import quantize

    torch.manual_seed(n + k)
    linear = quantize.Int4Linear(k, n, groupsize=groupsize, device="cuda")
    linear.weight, linear.scales_and_zeros = quantize.quantize_int4(torch.randn(n, k, device="cuda") / 30, groupsize)
    linear.pack_()
    return linear, torch.randn(1, k, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "n,k,groupsize",
    # Llama-3-8B's wo (16 warps) / wqkv / w2 / w13 (8 warps); an odd tile count (the last block's second tile past
    # the end); group 32; one tile and one supertile (16 warps, 15 of them without a supertile); an output head's
    # 4 warps (over 65536 rows at one row)
    [
        (65544, 1024, 64),
        (4096, 4096, 64),
        (6144, 4096, 128),
        (4096, 14336, 128),
        (28672, 4096, 64),
        (1000, 4096, 64),
        (520, 1024, 32),
        (8, 128, 128),
    ],
)
def test_int4_mma_gemv_equals_tinygemm(n, k, groupsize, monkeypatch):
    """One row through int4_mma (the CUDA tensor-core kernel, built with nvcc on first use) equals tinygemm
    (_weight_int4pack_mm) on the same packed weight up to tinygemm's bf16 rounding of each dequantized weight:
    eager, replayed in a CUDA graph under torch.compile, and through Int4Linear with FASTGEN_INT4_MMA's switch."""
    import int4_mma

    linear, x = random_int4_linear(n, k, groupsize)
    monkeypatch.setattr(int4_mma, "ENABLED", False)
    want = linear(x).float()  # tinygemm
    monkeypatch.setattr(int4_mma, "ENABLED", True)
    assert int4_mma.applies(x, linear.weight, groupsize)
    got = int4_mma.int4_mma_gemv(x, linear.weight, groupsize, linear.scales_and_zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    assert ((got.float() - want).norm() / want.norm()) < 1e-2
    compiled = torch.compile(int4_mma.int4_mma_gemv, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out = compiled(x, linear.weight, groupsize, linear.scales_and_zeros).clone()
    assert torch.equal(out, got)
    assert torch.equal(linear(x), got)
    for rows in (2, 5, 8):  # up to 8 rows in one pass (B's columns): each equals tinygemm's, row 0 the one-row result
        xs = torch.cat([x, torch.randn(rows - 1, k, device="cuda", dtype=torch.bfloat16)])
        want = torch.ops.aten._weight_int4pack_mm(xs, linear.weight, groupsize, linear.scales_and_zeros).float()
        assert int4_mma.applies(xs, linear.weight, groupsize)  # Int4Linear's decode at up to 8 rows goes here
        got_rows = int4_mma.int4_mma_gemv(xs, linear.weight, groupsize, linear.scales_and_zeros)
        assert got_rows.shape == (rows, n)
        assert ((got_rows.float() - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-2
        assert torch.allclose(got_rows[0].float(), got[0].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("groupsize,pdl", [(64, False), (128, True)])
def test_int4_mma_model_matches_dequantize_then_compute(float_checkpoint, tmp_path, monkeypatch, groupsize, pdl):
    """An int4 checkpoint decoded through int4_mma (its batch-1 linears), eager and compiled (CUDA graphs), is within
    the int4 tolerance of the dequantize-then-compute reference; with FASTGEN_INT4_PDL=1 too (launched with PDL,
    each kernel waits for the one before it in-kernel)."""
    import int4_mma
    from quantize import quantize_checkpoint

    monkeypatch.setattr(int4_mma, "ENABLED", True)
    monkeypatch.setattr(int4_mma, "PDL", pdl)
    qdir = quantize_checkpoint(float_checkpoint, "int4", groupsize, output_dir=tmp_path / "int4")
    reference = dequantized_reference(qdir)
    ids = PROMPTS[0] + [int(t) for t in torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))]
    want = teacher_forced_logits(reference, ids, len(PROMPTS[0]), compiled=False)
    model, _ = load_model(qdir, torch.device("cuda"), torch.bfloat16)
    assert int4_mma_decode_calls(model, ids, want, monkeypatch, "int4_mma_gemv")


def int4_mma_decode_calls(model, ids, want, monkeypatch, kernel_name: str, prepare=None) -> int:
    """Teacher-forced decode of ids eager and compiled (CUDA graphs), each within the int4 tolerance of want; the
    eager run's calls of int4_mma.<kernel_name> (counted, so the decode steps are known to go through it)."""
    import int4_mma

    calls = []
    kernel = getattr(int4_mma, kernel_name)
    for compiled in (False, True):
        spy = kernel if compiled else (lambda *args: calls.append(1) or kernel(*args))
        monkeypatch.setattr(int4_mma, kernel_name, spy)
        got = teacher_forced_logits(model, ids, len(PROMPTS[0]), compiled, prepare)
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        assert err < 3e-2, f"compiled={compiled}: worst step's relative error {err:.2e}"
        torch._dynamo.reset()
    return len(calls)


@pytest.mark.parametrize(
    "dim,n_heads,n_kv_heads,intermediate,groupsize",
    # Llama-3-8B's attention (8 warps) and a w13 of 16 warps; a small block (16 warps) at group 32 and 128
    [(4096, 32, 8, 4096, 64), (1024, 8, 2, 1024, 32), (1024, 8, 2, 2048, 128)],
)
@pytest.mark.parametrize("rope_tiles", [2, 4])
def test_int4_mma_folds_equal_their_references(
    dim, n_heads, n_kv_heads, intermediate, groupsize, rope_tiles, monkeypatch
):
    """int4_mma's one-row folds (Int4DecodeBlock's kernels, FASTGEN_INT4_FOLD=1) equal their references over
    tinygemm: the residual add; RMSNorm with SiLU(gate) * up of [gate; up]; RMSNorm with RoPE, q returned and k, v
    written into the caches at the slot and nowhere else. Eager, and the RoPE fold (it mutates the caches) replayed in
    a CUDA graph under torch.compile. The RoPE fold at 2 and 4 tiles a block (FASTGEN_INT4_ROPE_TILES; 4 at 8 warps
    only: Llama-3-8B's shape here)."""
    import int4_mma

    monkeypatch.setattr(int4_mma, "ROPE_FOLD_TILES", rope_tiles)
    if dim == 4096:  # the RoPE fold at 8 warps: the tiles asked for
        warps = int4_mma.config((n_heads + 2 * n_kv_heads) * 128, dim)["warps"]
        assert int4_mma.fold_tiles(int4_mma.NORM_ROPE, warps, 128) == rope_tiles

    D, slot = 128, torch.tensor([37], device="cuda")
    wqkv, x = random_int4_linear((n_heads + 2 * n_kv_heads) * D, dim, groupsize)
    wo, heads = random_int4_linear(dim, n_heads * D, groupsize)
    w13, _ = random_int4_linear(2 * intermediate, dim, groupsize)
    assert int4_mma.build() is not None and int4_mma.applies(x, wqkv.weight, groupsize)
    norm_weight = (1 + torch.randn(dim, device="cuda") / 4).bfloat16()
    residual = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)

    def close(got, want, what):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert got.shape == want.shape and got.dtype == want.dtype and err < 1e-2, f"{what}: {err:.2e}"

    args = (wo.weight, groupsize, wo.scales_and_zeros, residual)
    close(int4_mma.int4_mma_residual(heads, *args), int4_mma.residual_reference(heads, *args), "residual")
    args = (w13.weight, groupsize, w13.scales_and_zeros, norm_weight, 1e-5)
    close(int4_mma.int4_mma_norm_glu(x, *args), int4_mma.norm_glu_reference(x, *args), "norm, GLU")
    # x 4 bytes past a 16-byte boundary (a view): a staging of x with 16-byte loads must not take it (f494d96)
    x_unaligned = torch.cat([x.new_zeros(2), x.flatten()])[2:].view(1, dim)
    assert x_unaligned.data_ptr() % 16 == 4 and x_unaligned.is_contiguous()
    close(int4_mma.int4_mma_norm_glu(x_unaligned, *args), int4_mma.norm_glu_reference(x, *args), "unaligned x")

    # position 37 - 5: the kernel makes the angles of slot minus row_start from the model's inv_freq
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    row_start = torch.tensor([5], dtype=torch.int32, device="cuda")
    caches = [torch.randn(1, n_kv_heads, 64, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    want_k, want_v = (c.clone() for c in caches)
    args = (wqkv.weight, groupsize, wqkv.scales_and_zeros, norm_weight, 1e-5, inv_freq, row_start)
    want_q = int4_mma.norm_rope_kv_reference(x, *args, want_k, want_v, slot, n_heads)
    k, v = (c.clone() for c in caches)
    close(int4_mma.int4_mma_norm_rope_kv(x, *args, k, v, slot, n_heads), want_q, "q")
    close(k[:, :, 37], want_k[:, :, 37], "k")
    close(v[:, :, 37], want_v[:, :, 37], "v")
    for got, before in ((k, caches[0]), (v, caches[1])):  # every other slot as it was
        assert torch.equal(got[:, :, :37], before[:, :, :37]) and torch.equal(got[:, :, 38:], before[:, :, 38:])

    compiled = torch.compile(int4_mma.int4_mma_norm_rope_kv, fullgraph=True, mode="reduce-overhead")
    k, v = (c.clone() for c in caches)
    for _ in range(3):  # warm-up, record, replay
        k[:, :, 37] = 0
        q = compiled(x, *args, k, v, slot, n_heads).clone()
    close(q, want_q, "compiled q")
    close(k[:, :, 37], want_k[:, :, 37], "compiled k")


@pytest.mark.parametrize("groupsize,pdl", [(64, False), (128, True)])
def test_int4_decode_blocks_match_dequantize_then_compute(float_checkpoint, tmp_path, monkeypatch, groupsize, pdl):
    """An int4 checkpoint with Int4DecodeBlocks (FASTGEN_INT4_FOLD=1: each batch-1 step four int4_mma folds and the
    attention a layer), eager and compiled (CUDA graphs), is within the int4 tolerance of the dequantize-then-
    compute reference, its decode steps through the folds; with FASTGEN_INT4_PDL=1 too (each kernel waits for
    the one before it in-kernel: a wait in the wrong place reads a stale x)."""
    import int4_mma
    import quantize

    monkeypatch.setattr(int4_mma, "FOLD_ENABLED", True)
    monkeypatch.setattr(int4_mma, "PDL", pdl)
    qdir = quantize.quantize_checkpoint(float_checkpoint, "int4", groupsize, output_dir=tmp_path / "int4")
    reference = dequantized_reference(qdir)
    ids = PROMPTS[0] + [int(t) for t in torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))]
    want = teacher_forced_logits(reference, ids, len(PROMPTS[0]), compiled=False)
    model, _ = load_model(qdir, torch.device("cuda"), torch.bfloat16)

    def use_blocks(model):
        quantize.use_int4_decode_blocks(model)
        assert all(type(layer) is quantize.Int4DecodeBlock for layer in model.layers)

    calls = int4_mma_decode_calls(model, ids, want, monkeypatch, "int4_mma_norm_rope_kv", use_blocks)
    assert calls == (len(ids) - 1 - len(PROMPTS[0])) * len(model.layers)


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    model = random_model("gqa-hd128", seed=1)
    out = tmp_path_factory.mktemp("gpu") / "float"
    save_checkpoint(out, {"model_args": asdict(model.args), "quantization": None}, model.state_dict())
    return out


def dequantized_reference(quantized_dir) -> Transformer:
    """An fp32 CPU model whose weights are exactly what the quantized kernels multiply by."""
    from safetensors.torch import load_file

    from quantize import dequantize_int4

    config = read_checkpoint_config(quantized_dir)
    model = Transformer(model_args_from_dict(config["model_args"])).eval()
    stored = load_file(str(Path(quantized_dir) / "model.safetensors"))
    state = {}
    for name, ref in model.state_dict().items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.scales" in stored:
            state[name] = stored[name].float() * stored[f"{prefix}.scales"].float()[:, None]
        elif f"{prefix}.scales_and_zeros" in stored:
            w = dequantize_int4(stored[name], stored[f"{prefix}.scales_and_zeros"], config["quantization"]["groupsize"])
            state[name] = w[:, : ref.shape[1]]
        else:
            state[name] = stored[name].float()
    model.load_state_dict(state)
    return model


def teacher_forced_logits(model, ids: list[int], prompt_len: int, compiled: bool, prepare=None) -> torch.Tensor:
    """Logits [steps, V] of the decode steps that read ids[prompt_len:], one token at a time; prepare(model) runs
    once the caches are made (as Generator.setup's kernel choices do)."""
    device = model.tok_embeddings.weight.device

    def step(model, token, input_pos):
        return model(token, input_pos)[:, -1]

    step_fn = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compiled else step
    model.setup_caches(1, len(ids))
    model.set_row_starts(torch.zeros(1, dtype=torch.int32, device=device))
    if prepare is not None:
        prepare(model)
    tokens = torch.tensor([ids], device=device)
    out = []
    with torch.no_grad():
        out.append(model(tokens[:, :prompt_len], torch.arange(prompt_len, device=device))[:, -1].float().cpu())
        for pos in range(prompt_len, len(ids) - 1):
            logits = step_fn(model, tokens[:, pos : pos + 1], torch.tensor([pos], device=device))
            out.append(logits.float().cpu().clone())
    return torch.cat(out)


@pytest.mark.parametrize(
    "mode,groupsize,dtype,tol",
    [
        ("int8", None, torch.float32, 1e-4),
        ("int8", None, torch.bfloat16, 3e-2),
        ("int4", 64, torch.bfloat16, 3e-2),
        ("int4", 128, torch.bfloat16, 3e-2),
    ],
    ids=["int8-fp32", "int8-bf16", "int4-g64", "int4-g128"],
)
def test_quantized_weights_on_cuda_match_dequantize_then_compute(
    float_checkpoint, tmp_path, mode, groupsize, dtype, tol
):
    from quantize import quantize_checkpoint

    qdir = quantize_checkpoint(float_checkpoint, mode, groupsize, output_dir=tmp_path / mode)
    reference = dequantized_reference(qdir)
    ids = PROMPTS[0] + [int(t) for t in torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))]
    want = teacher_forced_logits(reference, ids, len(PROMPTS[0]), compiled=False)
    model, _ = load_model(qdir, torch.device("cuda"), dtype)
    for compiled in (False, True):
        got = teacher_forced_logits(model, ids, len(PROMPTS[0]), compiled)
        err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        assert err < tol, f"compiled={compiled}: worst step's relative error {err:.2e}"
        torch._dynamo.reset()
    if dtype == torch.float32:  # fp32 compute: the same greedy tokens as the reference
        assert greedy(model, PROMPTS[:2], 25, 64, compile=True) == greedy(reference, PROMPTS[:2], 25, 64)


def test_full_cache_is_a_clear_error_on_the_gpu():
    model = on(random_model("window"), "cuda", torch.bfloat16)
    p = PROMPTS[0]
    full = greedy(model, [p], 40 - len(p), 40, compile=True)
    assert len(full[0]) == 40 - len(p)
    with pytest.raises(UsageError, match="exceeds the cache"):
        greedy(model, [p], 40 - len(p) + 1, 40, compile=True)


def tiny_sentencepiece_model() -> bytes:
    """A small real SentencePiece model trained on the spot (the GPU machine has no assets)."""
    import io

    import sentencepiece as spm

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old tunes".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def test_cli_compiled_on_cuda_writes_json(tmp_path):
    """generate.py as a user runs it on the GPU: --compile, bf16 by default, a batch, --json."""
    torch.manual_seed(0)
    args = ModelArgs(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=1, intermediate_size=256, vocab_size=300, max_position_embeddings=512
    )  # the tokenizer's vocab
    ckpt = save_checkpoint(
        tmp_path / "tiny",
        {"model_args": asdict(args), "quantization": None},
        Transformer(args).state_dict(),
        {"tokenizer.model": tiny_sentencepiece_model()},
    )
    out_json = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "the fox",
            "--prompt",
            "seven wizards quietly hum",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0",
            "--compile",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out_json.read_text())
    assert data["device"] != "cpu" and data["dtype"] == "bfloat16"
    assert len(data["rows"]) == 2
    assert all(len(r["token_ids"]) == 16 or r["stopped"] for r in data["rows"])
    assert data["decode_tokens_per_s"] > 0
