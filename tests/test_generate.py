"""The generation loop on a tiny random model: cache sizes, batching, compile, limits, sampling."""

import pytest
import torch

from generate import Generator, Sampling, UsageError, decode_next, decode_one, sample
from model import KVCache, ModelArgs, Transformer, TransformerBlock

VOCAB = 97


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    args = ModelArgs(
        **{
            **dict(
                dim=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                intermediate_size=96,
                vocab_size=VOCAB,
                max_position_embeddings=8192,
            ),
            **overrides,
        }
    )
    model = Transformer(args).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        model.tok_embeddings.weight.normal_(0, 1.0)
        if model.output is not None:  # tie_embeddings: the embedding is the head
            model.output.weight.normal_(0, 1.0)
    return model


def greedy(model, prompts, n, max_seq_len, compile=False, stop_ids=()):
    gen = Generator(model, compile=compile)
    gen.setup(len(prompts), max_seq_len)
    return gen.generate(prompts, n, Sampling(), stop_ids=stop_ids)


PROMPTS = [[5, 17, 3, 88, 41, 2, 9], [60, 1, 7], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45], [12]]


def test_large_cache_equals_just_enough_slots():
    model = tiny_model()
    p = PROMPTS[0]
    small = greedy(model, [p], 30, len(p) + 30).tokens
    large = greedy(model, [p], 30, 4096).tokens
    assert small == large
    assert len(small[0]) == 30


def test_sliding_window_large_cache_equals_just_enough_slots():
    model = tiny_model(sliding_window=8)
    p = PROMPTS[2]
    assert greedy(model, [p], 25, len(p) + 25).tokens == greedy(model, [p], 25, 1000).tokens


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_batch_of_different_lengths_equals_each_alone(sliding_window):
    model = tiny_model(sliding_window=sliding_window)
    batch = greedy(model, PROMPTS, 20, 64).tokens
    for b, p in enumerate(PROMPTS):
        alone = greedy(model, [p], 20, 64).tokens[0]
        assert batch[b] == alone, f"row {b}"


def test_rows_stop_at_their_own_stop_token():
    model = tiny_model()
    free = greedy(model, PROMPTS[:2], 15, 64).tokens
    stop = free[0][4]  # row 0 emits this at step 4; row 1 may never
    res = greedy(model, PROMPTS[:2], 15, 64, stop_ids=[stop])
    for b in range(2):
        if stop in free[b]:
            assert res.tokens[b] == free[b][: free[b].index(stop)] and res.stopped[b]
        else:
            assert res.tokens[b] == free[b] and not res.stopped[b]
    assert res.stopped[0]


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_chunked_prefill_equals_one_shot(sliding_window):
    model = tiny_model(sliding_window=sliding_window)
    one_shot = greedy(model, PROMPTS, 10, 64).tokens
    gen = Generator(model, prefill_chunk_size=3)  # chunks that split every prompt, padded rows too
    gen.setup(len(PROMPTS), 64)
    assert gen.generate(PROMPTS, 10, Sampling()).tokens == one_shot


def test_compiled_decode_equals_eager():
    model = tiny_model()
    eager = greedy(model, PROMPTS[:2], 12, 64).tokens
    compiled = greedy(model, PROMPTS[:2], 12, 64, compile=True).tokens
    assert compiled == eager


def test_token_log_reads_each_steps_ids_at_its_position(monkeypatch):
    """generate.TOKEN_LOG (the default): each decode step writes its token ids into the model's token_log at its
    position and the reader takes them from there: the tokens of the reads by copy (FASTGEN_TOKEN_LOG=0), a chat's
    second turn too. Eager only: a CPU Generator's compile wraps decode_one alone, its log write stays eager (the
    step compiled whole, as on an sm_90 GPU, is the next test's)."""
    import generate

    model = tiny_model()
    monkeypatch.setattr(generate, "TOKEN_LOG", False)
    plain = Generator(model)
    plain.setup(len(PROMPTS), 64)
    want = plain.generate(PROMPTS, 12, Sampling(), stop_ids=[7]).tokens
    plain.setup(1, 64)
    chat = [plain.generate([PROMPTS[0]], 6, Sampling()).tokens[0]]
    chat.append(plain.generate([[3, 4]], 6, Sampling(), continue_sequence=True).tokens[0])
    assert getattr(model, "token_log", None) is None and want == greedy(tiny_model(), PROMPTS, 12, 64, [7]).tokens

    monkeypatch.setattr(generate, "TOKEN_LOG", True)
    gen = Generator(model)
    gen.setup(len(PROMPTS), 64)
    assert gen.generate(PROMPTS, 12, Sampling(), stop_ids=[7]).tokens == want
    log = model.token_log
    assert log.shape == (len(PROMPTS), model.cache_len)
    first = max(map(len, PROMPTS))  # the first decode step's position: its ids are the second tokens
    assert [row[first] for row in log.tolist()] == [t[1] if len(t) > 1 else 7 for t in want]
    gen.setup(1, 64)  # a log of the new shape
    assert model.token_log.shape == (1, model.cache_len)
    assert gen.generate([PROMPTS[0]], 6, Sampling()).tokens[0] == chat[0]
    assert gen.generate([[3, 4]], 6, Sampling(), continue_sequence=True).tokens[0] == chat[1]


def test_setup_makes_the_token_log_again_when_it_is_not_on_the_generators_device(monkeypatch):
    """A model's token_log left on another device (a model moved after a Generator's setup: on CUDA a moved log
    is device memory, not the host memory the reader polls) is made again by setup, not kept for its shape."""
    import generate

    monkeypatch.setattr(generate, "TOKEN_LOG", True)
    model = tiny_model()
    model.setup_caches(len(PROMPTS), 64)
    model.register_buffer("token_log", torch.empty((len(PROMPTS), model.cache_len), device="meta"), persistent=False)
    gen = Generator(model)
    gen.setup(len(PROMPTS), 64)
    assert model.token_log.device.type == "cpu" and (model.token_log == -1).all()
    assert gen.generate(PROMPTS, 6, Sampling()).tokens == greedy(tiny_model(), PROMPTS, 6, 64).tokens


@torch.no_grad()
def test_compiled_step_writes_the_token_log_in_place():
    """The step compiled whole (as generate.py compiles it around the fused blocks on an sm_90 GPU) writes its
    token into the model's token_log buffer at its position, in the caller's tensor (TOKEN_LOG's reader polls it)."""
    model = tiny_model()
    model.setup_caches(2, 32)
    model(torch.tensor([[5, 17, 3], [60, 1, 7]]), torch.arange(3))
    log = torch.full((2, 32), -1, dtype=torch.long)
    model.register_buffer("token_log", log, persistent=False)
    token, input_pos = torch.tensor([[41], [9]]), torch.tensor([3])
    torch.compile(decode_next, fullgraph=True)(model, token, input_pos, Sampling())
    assert log[:, 3].tolist() == token.view(-1).tolist() and input_pos.tolist() == [4]
    assert (log[:, :3] == -1).all() and (log[:, 4:] == -1).all()
    del model.token_log
    torch._dynamo.reset()


@torch.no_grad()
def test_decode_step_leaves_the_next_steps_inputs_in_place():
    """generate.decode_next (the Generator's step) overwrites its token with the next token and moves its
    position one slot on, handing both back: a CUDA graph of it replays with nothing between replays."""
    model = tiny_model()
    model.setup_caches(2, 32)
    model(torch.tensor([[5, 17, 3], [60, 1, 7]]), torch.arange(3))
    token, input_pos = torch.tensor([[41], [9]]), torch.tensor([3])
    want = decode_one(model, token.clone(), input_pos.clone(), Sampling())
    model(torch.tensor([[5, 17, 3], [60, 1, 7]]), torch.arange(3))  # the same cache again
    got_token, got_pos = decode_next(model, token, input_pos, Sampling())
    assert got_token is token and got_pos is input_pos  # the caller's tensors, overwritten
    assert torch.equal(token, want) and input_pos.tolist() == [4]


def test_cuda_graph_step_runs_the_step_twice_from_the_callers_inputs_before_capturing(monkeypatch):
    """CUDAGraphStep.record (CUDA's stream and graph calls stood in for, so it runs here): two plain runs of an
    advancing step, both outside the capture and both from the caller's token and position (the first run moved its
    buffers on), then one capture. A compiled step that recompiles on its second call (a guard on Python state its
    first call changed) so compiles and autotunes before the capture, where Inductor's benchmarking breaks it.
    The GPU test test_cuda_graph_step_runs_a_step_twice_before_capture checks the same on CUDA."""
    import contextlib

    import generate

    runs, capturing = [], [False]

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            runs.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        capturing[0] = True
        yield
        capturing[0] = False

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)

    def step(model, token, input_pos):
        runs.append((capturing[0], token.item(), input_pos.item()))
        token.add_(1)
        input_pos.add_(1)
        return token, input_pos

    model = tiny_model()
    model.setup_caches(1, 32)
    generate.CUDAGraphStep(step)(model, torch.tensor([[41]]), torch.tensor([3]))
    assert runs[:2] == [(False, 41, 3), (False, 41, 3)]  # two plain runs from the same inputs
    assert runs[2][0] and runs[3:] == ["replay"]  # then one capture, then the replay


def test_cache_fills_exactly_and_one_more_token_is_a_clear_error():
    model = tiny_model()
    p = PROMPTS[0]
    max_seq_len = 40
    full = greedy(model, [p], max_seq_len - len(p), max_seq_len)  # prompt + new == every slot
    assert len(full.tokens[0]) == max_seq_len - len(p)
    assert full.tokens == greedy(model, [p], max_seq_len - len(p), 512).tokens
    with pytest.raises(UsageError, match="exceeds the cache"):
        greedy(model, [p], max_seq_len - len(p) + 1, max_seq_len)


@pytest.mark.parametrize("first_call_ends", ["at its budget", "at a stop token", "interrupted"])
def test_continued_sequence_equals_one_shot(first_call_ends):
    """The Generator holds a chat's place in the cache: a continue_sequence call passes only the new
    ids, and its tokens equal one prefill of the whole sequence, however the first call ended."""
    model = tiny_model()
    first, second = PROMPTS[0], PROMPTS[1]
    free = greedy(model, [first], 6, 128).tokens[0]
    gen = Generator(model)
    gen.setup(1, 128)
    stop_ids, on_token = (), None
    if first_call_ends == "at a stop token":
        stop_ids = [free[3]]
    if first_call_ends == "interrupted":

        def on_token(row, token_id):
            if len(seen) == 2:
                raise KeyboardInterrupt
            seen.append(token_id)

        seen = []
        with pytest.raises(KeyboardInterrupt):
            gen.generate([first], 6, Sampling(), on_token=on_token)
        sampled = seen + [None]  # the third token reached the host; the cache holds the two before it
        sequence = first + free[:3]
    else:
        r1 = gen.generate([first], 6, Sampling(), stop_ids=stop_ids)
        sampled = r1.tokens[0] + [r1.last_token[0]] * r1.stopped[0]
        sequence = first + sampled
    assert gen.position == len(first) + len(sampled) - 1
    r2 = gen.generate([second], 8, Sampling(), continue_sequence=True)
    assert r2.tokens == greedy(model, [sequence + second], 8, 128).tokens
    gen.reset()  # back to an empty cache: the same as a fresh Generator
    assert (
        gen.generate([second], 8, Sampling(), continue_sequence=True).tokens == greedy(model, [second], 8, 128).tokens
    )


def test_greedy_token_is_argmax():
    """generate.greedy_token (argmax over chunks, then over the chunks' maxima) picks argmax's token,
    the first of equal maxima too, at vocabularies shorter than, equal to and not a multiple of its
    chunk, eager and compiled."""
    from generate import greedy_token

    torch.manual_seed(0)
    compiled = torch.compile(greedy_token, fullgraph=True, dynamic=False)
    for V in (50, 1024, 3000, 49152 + 7):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(3, V) * 3).to(dtype)
            logits[1, [V // 3, V - 1]] = 100.0  # a tie across chunks: the first wins
            logits[2, :] = 0.0  # all tied: id 0
            want = logits.argmax(-1, keepdim=True)
            assert torch.equal(greedy_token(logits), want), (V, dtype)
            assert want[1].item() == V // 3 and want[2].item() == 0
            if V == 3000:
                assert torch.equal(compiled(logits), want)


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    assert torch.equal(sample(logits, Sampling()), logits.argmax(-1, keepdim=True))
    # top-k = 1 and a tiny top-p are greedy whatever the temperature
    assert torch.equal(sample(logits, Sampling(temperature=5.0, top_k=1)), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample(logits, Sampling(temperature=5.0, top_p=1e-6)), logits.argmax(-1, keepdim=True))
    # top-k keeps draws inside the k best
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        drawn = sample(logits, Sampling(temperature=2.0, top_k=3))
        assert (drawn == top3).any(-1).all()
    # the same seed draws the same tokens
    torch.manual_seed(1)
    a = sample(logits, Sampling(temperature=1.0, top_p=0.9))
    torch.manual_seed(1)
    assert torch.equal(a, sample(logits, Sampling(temperature=1.0, top_p=0.9)))


def test_sampling_never_chooses_an_id_past_vocab_size():
    logits = torch.zeros(3, 50)
    logits[:, 45] = 100.0  # a padded id that would win
    limited = Sampling(vocab_size=40)
    assert (sample(logits, limited) < 40).all()
    for temperature in (1.0, 50.0):
        assert (sample(logits, Sampling(temperature=temperature, top_p=0.99, vocab_size=40)) < 40).all()
    assert sample(logits, Sampling()).eq(45).all()


def test_sampling_matches_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    draws = torch.cat([sample(logits, Sampling(temperature=1.0)) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (freq - probs[0]).abs().max() < 0.03
    # top-p 0.7 keeps {0.5, 0.3}: renormalised 0.625 / 0.375
    draws = torch.cat([sample(logits, Sampling(temperature=1.0, top_p=0.7)) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03


def test_bad_requests():
    model = tiny_model()
    gen = Generator(model)
    gen.setup(1, 32)
    with pytest.raises(UsageError, match="empty prompt"):
        gen.generate([[]], 4)
    with pytest.raises(UsageError, match="at least 1"):  # no new tokens asked for
        gen.generate([[1, 2]], 0)
    with pytest.raises(UsageError, match="batch of 2"):
        gen.generate([[1], [2]], 4)


def test_eager_prefill_attends_over_the_written_slots_only(monkeypatch):
    """An eager prefill into a big cache runs SDPA over the slots up to the chunk's end (rounded
    to a block), not over the whole allocation; decode steps see the whole cache (static shape)."""
    import model as model_module

    seen = []
    real = model_module.sdpa_attention_over_cache

    def spy(q, cache, folded_mask):
        seen.append((q.shape[2], folded_mask.shape[-1]))
        return real(q, cache, folded_mask)

    monkeypatch.setattr(model_module, "sdpa_attention_over_cache", spy)
    model = tiny_model()
    gen = Generator(model, prefill_chunk_size=150)
    gen.setup(1, 4096)
    prompt = list(range(1, 91)) * 2 + [5]  # 181 tokens: chunks of 150 and 31
    gen.generate([prompt], 3, Sampling())
    per_forward = seen[:: model.args.n_layers]  # (query tokens, visible slots)
    assert per_forward == [(150, 256), (31, 256), (1, 4096), (1, 4096)]


def test_flex_decode_options_reach_the_compiled_decode_step(monkeypatch):
    """model.flex_decode_options (scripts/profile_decode.py --flex-decode-options) go to flex_attention
    at decode under the compiler, and nowhere else; the tokens stay those of the eager run."""
    import model as model_module

    seen = []
    real = model_module.flex_attention

    def recording(q, k, v, kernel_options=None, **kwargs):
        seen.append((q.shape[2], kernel_options))
        return real(q, k, v, **kwargs)  # the CPU lowering takes no flex-decoding options

    monkeypatch.setattr(model_module, "flex_attention", recording)
    model = tiny_model()
    prompts = [[5, 17, 3, 88, 41], [60, 1]]
    gen = Generator(model)
    gen.setup(2, 64)
    eager = gen.generate(prompts, 6, Sampling()).tokens
    torch._dynamo.reset()
    model.flex_decode_options = {"SPLIT_KV": 1}
    compiled = Generator(model, compile=True)
    compiled.setup(2, 64)
    try:
        assert compiled.generate(prompts, 6, Sampling()).tokens == eager
    finally:
        torch._dynamo.reset()
    assert seen and all(entry == (1, {"SPLIT_KV": 1}) for entry in seen)


def test_split_kv_cache_decode_plumbing(monkeypatch):
    """The default bf16 cache (kv_attention.SplitKVCache) sends decode steps to its own
    attention, given each row's start and the query's slot; run here with kv_attention's reference
    standing in for the CUDA kernel, eager and compiled, it decodes a batch of different-length
    prompts to the tokens of the plain KVCache (flex) path."""
    import kv_attention

    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=97)
    ).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 1.0)
    prompts = [[5, 17, 3, 88, 41, 9, 2, 30, 11], [60, 1]]
    gen = Generator(model)
    gen.setup(2, 64)
    plain = gen.generate(prompts, 12, Sampling()).tokens
    calls = torch.zeros((), dtype=torch.long)  # a tensor, so the compiled step can count too

    def reference(q, k_cache, v_cache, row_start, q_slot, sliding_window):
        assert q.shape[2] == 1  # decode steps only
        calls.add_(1)
        return kv_attention.quantized_decode_attention_reference(
            q, k_cache, None, v_cache, None, row_start, q_slot, sliding_window or None
        )

    monkeypatch.setattr(kv_attention, "UNQUANTIZED_ENABLED", True)
    monkeypatch.setattr(kv_attention.SplitKVCache, "attends_at_decode", lambda self: True)
    monkeypatch.setattr(kv_attention, "decode_attention", reference, raising=False)
    for compile, max_seq_len in ((False, 72), (True, 80)):  # a new length makes setup() remake the caches
        torch._dynamo.reset()
        calls.zero_()
        gen = Generator(model, compile=compile)
        gen.setup(2, max_seq_len)
        assert isinstance(model.layers[0].attention.kv_cache, kv_attention.SplitKVCache)
        assert gen.generate(prompts, 12, Sampling()).tokens == plain
        assert calls == 11 * model.args.n_layers
    torch._dynamo.reset()


def test_pdl_launch_only_where_this_repo_launches_on_sm90(monkeypatch):
    """kv_attention.pdl_launch: programmatic dependent launch (the PDL constexpr and Triton's launch_pdl)
    only with kv_attention.PDL on, for a CUDA tensor of an sm_90+ device, in an op's eager call (a
    triton_op runs its body with wrap_triton off); never while torch.compile traces the op (Inductor
    would take launch_pdl for a kernel argument), on the CPU, or before Hopper."""
    from types import SimpleNamespace

    from torch._library.triton import set_wrap_triton_enabled

    import kv_attention

    cuda = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # stands in for a CUDA tensor
    capability = {0: 9}
    monkeypatch.setattr(kv_attention, "_compute_capability", lambda index: capability[index])
    on = {"PDL": True, "launch_pdl": True}
    with set_wrap_triton_enabled(False):  # an eager call
        monkeypatch.setattr(kv_attention, "PDL", False)  # FASTGEN_PDL=0: off
        assert kv_attention.pdl_launch(cuda) == {"PDL": False}
        monkeypatch.setattr(kv_attention, "PDL", True)  # the default
        assert kv_attention.pdl_launch(cuda) == on
        assert kv_attention.pdl_launch(torch.zeros(1)) == {"PDL": False}
        capability[0] = 8
        assert kv_attention.pdl_launch(cuda) == {"PDL": False}
        capability[0] = 10
        assert kv_attention.pdl_launch(cuda) == on
        assert kv_attention.pdl_applies(cuda.device)
        monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm: no griddepcontrol, whatever its capability
        assert kv_attention.pdl_launch(cuda) == {"PDL": False} and not kv_attention.pdl_applies(cuda.device)
        monkeypatch.setattr(torch.version, "hip", None)
    with set_wrap_triton_enabled(True):  # traced
        assert kv_attention.pdl_launch(cuda) == {"PDL": False}


def test_compile_blocks_compiles_one_block_for_every_layer():
    """Generator(compile_blocks=True) (--compile-blocks): each TransformerBlock compiled alone, one compile
    serving every layer (one decode graph for 4 layers, not 4), with the plain eager tokens; prefill runs
    the blocks eager (no compile for any prompt length), so a batch of other lengths adds only its decode."""
    model = tiny_model(n_layers=4)
    prompt = [[5, 17, 3, 88, 41, 9, 2, 30, 11]]
    plain = greedy(model, prompt, 12, 64).tokens
    batch = greedy(model, PROMPTS, 6, 64).tokens
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = Generator(model, compile_blocks=True)
    gen.setup(1, 64)
    assert gen.generate(prompt, 12, Sampling()).tokens == plain
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    gen.setup(len(PROMPTS), 64)
    assert gen.generate(PROMPTS, 6, Sampling()).tokens == batch
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # + batch 4's decode
    with pytest.raises(ValueError, match="compile_blocks"):
        Generator(model, compile=True, compile_blocks=True)
    torch._dynamo.reset()


@pytest.mark.parametrize("overrides", [{}, dict(n_experts=4, n_active_experts=2)])
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_pdl_compiles_around_the_fused_blocks(monkeypatch, reference_decode_kernels, overrides, compile_blocks):
    """With kv_attention.PDL, --compile compiles what surrounds the batch-1 blocks and runs each
    gemv.DecodeBlock eager (a graph break), where its kernels can launch with PDL: the plain block's
    tokens, and every decode step's block projections called outside the compiler (a mixture of experts'
    two attention projections and its router; its pick and mix as route and expert_down_mix). Not when the
    cache has no attention kernel of ours (FASTGEN_DECODE_KERNEL=0: flex_attention, which eager is math with
    host copies that a CUDA graph capture refuses): the blocks are traced then. compile_blocks
    (--compile-blocks): each DecodeBlock compiled alone, its batch-1 step breaking out the same way."""
    import gemv
    import kv_attention

    def run(max_seq_len):
        gen = Generator(model, compile=not compile_blocks, compile_blocks=compile_blocks)
        gen.setup(1, max_seq_len)
        return gen.generate(prompt, 12, Sampling()).tokens

    def split_kv_reference(q, k_cache, v_cache, row_start, q_slot, sliding_window):  # the CUDA kernel's stand-in
        return kv_attention.quantized_decode_attention_reference(
            q, k_cache, None, v_cache, None, row_start, q_slot, sliding_window or None
        )

    model = tiny_model(**overrides)
    prompt = [[5, 17, 3, 88, 41, 9, 2, 30, 11]]
    plain = greedy(model, prompt, 12, 64).tokens
    reference_decode_kernels()
    stand_in = gemv.decode_gemv
    eager_calls = []

    def decode_gemv(*args, **kwargs):
        in_block = kwargs.get("norm_weight") is not None or kwargs.get("residual") is not None  # not the output's
        if in_block and not torch.compiler.is_compiling():  # traced code never touches the list (else a guard)
            eager_calls.append(1)
        return stand_in(*args, **kwargs)

    monkeypatch.setattr(gemv, "decode_gemv", decode_gemv)
    monkeypatch.setattr(kv_attention, "PDL", True)
    monkeypatch.setattr(kv_attention, "pdl_applies", lambda device: True)  # a CPU stands in for an sm_90 GPU
    monkeypatch.setattr(kv_attention, "UNQUANTIZED_ENABLED", True)
    monkeypatch.setattr(kv_attention.SplitKVCache, "attends_at_decode", lambda self: True)
    monkeypatch.setattr(kv_attention, "decode_attention", split_kv_reference, raising=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert run(72) == plain
    # Transformer.forward itself stays compiled (its prologue, its final norm): the graph breaks at
    # run_layers' call and resumes after it; a break inside forward's own loop would run all of it eager
    resumed = torch._dynamo.utils.counters["resumes"]
    assert compile_blocks or any(name.startswith("torch_dynamo_resume_in_forward") for name in resumed)
    per_layer = 3 if overrides else 4  # wqkv, wo, and w13, w2 or the router (the ones with a norm or residual)
    assert sum(eager_calls) == 11 * per_layer * model.args.n_layers  # 11 decode steps
    monkeypatch.setattr(kv_attention, "UNQUANTIZED_ENABLED", False)  # the plain cache: flex_attention
    torch._dynamo.reset()
    eager_calls.clear()
    assert run(80) == plain
    assert type(model.layers[0].attention.kv_cache) is KVCache and not eager_calls
    torch._dynamo.reset()


@pytest.mark.parametrize("overrides", [dict(qkv_bias=True, sliding_window=6), dict(qk_norm=True)])
def test_rope_in_qkv_plumbing(monkeypatch, reference_decode_kernels, overrides):
    """With gemv.ROPE_IN_QKV at its default a float DecodeBlock's step runs wqkv, RoPE and the cache write as one
    decode_gemv_rope_kv (its reference here; wqkv's bias where a residual goes): the plain block's
    tokens, eager and compiled, rope_write_kv never called; a block with query/key norms (Qwen3: a
    head's norm needs the whole head, a program has two rows of it) keeps rope_write_kv."""
    import gemv

    model = tiny_model(**overrides)
    prompt = [[5, 17, 3, 88, 41, 9, 2, 30, 11]]
    plain = greedy(model, prompt, 12, 64).tokens
    calls, rope_calls = reference_decode_kernels()
    fused_calls = torch.zeros((), dtype=torch.long)  # a tensor, so the compiled step can count too

    def decode_gemv_rope_kv(*args):
        fused_calls.add_(1)
        return gemv.decode_gemv_rope_kv_reference(*args)

    monkeypatch.setattr(gemv, "ROPE_IN_QKV", "float")  # the default: float weights fold it
    monkeypatch.setattr(gemv, "decode_gemv_rope_kv", decode_gemv_rope_kv, raising=False)
    qk_norm = model.args.qk_norm
    for compile, max_seq_len in ((False, 72), (True, 80)):
        torch._dynamo.reset()
        for counter in (calls, rope_calls, fused_calls):
            counter.zero_()
        assert greedy(model, prompt, 12, max_seq_len, compile=compile).tokens == plain
        steps = 11 * model.args.n_layers
        assert (fused_calls, rope_calls) == ((0, steps) if qk_norm else (steps, 0))
        assert calls == (4 if qk_norm else 3) * steps + 12  # the block's other GEMVs, and the output's
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(qkv_bias=True, qk_norm=True, sliding_window=6), dict(n_experts=4, n_active_experts=2), "experts", "int8"],
)
def test_fused_decode_block_plumbing(monkeypatch, reference_decode_kernels, overrides):
    """gemv.DecodeBlock (a GPU's default batch-1 path: the step's four projections as decode_gemv with
    the norms, SiLU * up and the residual adds folded in, float or int8 weights; a mixture of experts'
    two attention ones; RoPE and the cache write as one kernel), run here with the references standing
    in for the CUDA kernels, eager and compiled, decodes to the tokens of the plain block; batches and
    prefill stay on the plain path, and a block with tensor parallel's hooks is never fused."""
    import gemv
    import kv_attention
    import quantize

    if overrides == "int8":
        model = tiny_model(qkv_bias=True)
        floats = {name: (m.weight.detach(), m.bias) for name, m in quantize.quantizable_linears(model)}
        quantize.apply_quantization(model, {"mode": "int8"})
        for name, (weight, bias) in floats.items():
            linear = model.get_submodule(name)
            linear.weight, linear.scales = quantize.quantize_int8(weight)
            if bias is not None:
                linear.bias = bias
        # their few-row GPU kernel, here as its reference (gemv.available is True below); one row goes
        # through decode_gemv, which reference_decode_kernels replaces
        monkeypatch.setattr(gemv, "int8_gemm_few_rows", gemv.int8_gemv_reference, raising=False)
    elif overrides == "experts":  # the token's experts through decode_gemv_experts too
        model = tiny_model(n_experts=4, n_active_experts=2)
    else:
        model = tiny_model(**overrides)
    monkeypatch.setattr(gemv, "EXPERT_GEMV_ENABLED", overrides == "experts")
    prompt = [[5, 17, 3, 88, 41, 9, 2, 30, 11]]
    plain = greedy(model, prompt, 12, 64).tokens
    batch = greedy(model, PROMPTS[:2], 6, 64).tokens
    calls, rope_calls = reference_decode_kernels()
    for compile, max_seq_len in ((False, 72), (True, 80)):
        torch._dynamo.reset()
        calls.zero_()
        rope_calls.zero_()
        assert greedy(model, prompt, 12, max_seq_len, compile=compile).tokens == plain
        assert rope_calls == 11 * model.args.n_layers
        assert type(model.layers[0]) is gemv.DecodeBlock
        # decode_gemv calls a layer: four fused projections; or a mixture of experts' two attention ones and
        # its router (a DecodeLinear; compiled, MoEFeedForward.route's matvec); or with decode_gemv_experts
        # those two, the router (decode_gemv, the norm folded in) and the experts' two
        # (eager with kv_attention.PDL, the default, route picks too, and expert_down_mix takes the experts' second)
        routed = overrides == "experts" and not compile and kv_attention.PDL
        fused = 4 if not model.args.n_experts else 5 + routed if overrides == "experts" else 2 + (not compile)
        # the 11 decode steps, and the output projection (DecodeLinear) of those and of the prompt's last row
        output = 12  # a DecodeLinear's or an Int8Linear's: both decode_gemv at one row
        assert calls == 11 * fused * model.args.n_layers + output
        assert greedy(model, PROMPTS[:2], 6, max_seq_len, compile=compile).tokens == batch
        assert calls == 11 * fused * model.args.n_layers + output
    torch._dynamo.reset()
    hooked = tiny_model()
    hooked.layers[0].attention.wo.register_forward_hook(lambda module, inputs, output: output)
    gemv.use_decode_kernels(hooked)
    assert type(hooked.layers[0]) is TransformerBlock and type(hooked.layers[1]) is gemv.DecodeBlock
    # a strided weight (a transposed copy) is never handed to decode_gemv, which would copy it every step
    strided = tiny_model()
    wo = strided.layers[0].attention.wo
    wo.weight = torch.nn.Parameter(wo.weight.detach().t().contiguous().t(), requires_grad=False)
    gemv.use_decode_kernels(strided)
    assert type(strided.layers[0]) is TransformerBlock and type(strided.layers[1]) is gemv.DecodeBlock
    assert type(wo) is gemv.DecodeLinear
    calls.zero_()
    with torch.no_grad():
        assert torch.equal(
            wo(torch.ones(1, 1, wo.in_features)),
            torch.nn.functional.linear(torch.ones(1, 1, wo.in_features), wo.weight),
        )
    assert calls == 0
    # by default a float block wider than FUSED_FLOAT_MAX_DIM stays plain (the folds lost at Llama-3-8B's
    # 4096 on the H200) and gets DecodeLinears; an int8 block of any width is fused
    monkeypatch.setattr(gemv, "FUSED_FLOAT_MAX_DIM", model.args.dim - 1)
    wide = tiny_model()
    gemv.use_decode_kernels(wide)
    assert type(wide.layers[0]) is TransformerBlock and type(wide.layers[0].attention.wqkv) is gemv.DecodeLinear
    assert gemv.fused_by_default(model.layers[0]) == (overrides == "int8")


def test_decode_gemv_tiles_follow_the_measured_shapes():
    """gemv.decode_gemv_tiles gives each float weight shape the tile its whole-step A/B won with (BENCHMARKS.md):
    SmolLM2's small w13 / w2 theirs, Qwen3-30B-A3B's short-K wqkv 8 outputs over 512-wide K steps; wider
    K (Llama-3-8B's wqkv), a square short-K weight (Llama-3.2-1B's wo), a vocabulary-wide head and int8 weights
    keep theirs."""
    import gemv

    def tile(n, k, int8=False, glu=False):
        cfg = gemv.decode_gemv_tiles(n, k, int8, glu)
        return cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]

    assert tile(1536 * 2, 576, glu=True) == (2, 1024, 2)  # SmolLM2 w13 (small, glu)
    assert tile(576, 1536) == (2, 2048, 8)  # SmolLM2 w2 (small, K > 1024)
    assert tile(5120, 2048) == (8, 512, 4)  # Qwen3-30B-A3B wqkv (short K)
    assert tile(960, 576) == tile(6144, 4096) == tile(151936, 2048) == (2, 1024, 4)  # the plain tile
    assert tile(2048, 2048) == (2, 1024, 4)  # Llama-3.2-1B's wo: square, lost with the short-K tile
    assert tile(5120, 2048, int8=True) == (4, 1024, 4)  # int8: int8_gemv_config's
