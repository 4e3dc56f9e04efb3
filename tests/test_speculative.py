"""Speculative decoding (prompt lookup and draft models): greedy output is plain greedy's token for
token, batches give each row what it gives alone, sampling keeps the target's distribution,
chats continue, bad input is one line with exit code 2. The `gpu`-marked tests run the compiled
CUDA path (python -m pytest -m gpu tests/test_speculative.py)."""

import itertools
import json
from dataclasses import asdict

import pytest
import torch
from test_cli import make_tiny_checkpoint, run_main
from test_generate import PROMPTS, greedy, tiny_model

from checkpoint import load_model, save_checkpoint
from generate import Generator, Sampling, Speculation, UsageError, sampling_probs
from model import ModelArgs, Transformer
from speculative import accept, propose_by_lookup

# Rows that repeat themselves, so prompt lookup finds guesses (and gets some right), beside PROMPTS'
REPEATS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [40, 41, 42, 40, 41], [3, 3, 3, 3]]


def speculative(model, prompts, n, max_seq_len, speculation, sampling=None, compile=False):
    gen = Generator(model, compile=compile, speculation=speculation)
    gen.setup(len(prompts), max_seq_len)
    return gen.generate(prompts, n, sampling or Sampling())


SOURCES = {  # the speculation for a target tiny_model(sliding_window=window)
    "lookup": lambda window=None: Speculation(4, lookup_ngram=3),
    "draft-other": lambda window=None: Speculation(3, draft=tiny_model(seed=1, sliding_window=window)),  # mostly wrong
    "draft-self": lambda window=None: Speculation(5, draft=tiny_model(sliding_window=window)),  # every guess right
    "draft-k1": lambda window=None: Speculation(1, draft=tiny_model(sliding_window=window)),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_greedy_equals_plain_greedy_and_a_batch_each_row_alone(source, sliding_window):
    model = tiny_model(sliding_window=sliding_window)
    spec = SOURCES[source](sliding_window)
    prompts = PROMPTS + REPEATS
    plain = greedy(model, prompts, 24, 64).tokens
    batch = speculative(model, prompts, 24, 64, spec)
    assert batch.tokens == plain
    for b, p in enumerate(prompts):
        assert speculative(model, [p], 24, 64, spec).tokens[0] == plain[b], f"row {b}"
    stats = batch.speculation
    if source == "draft-self":  # every guess stands: k + 1 tokens per step (the budget cuts the last)
        assert stats.acceptance_rate == 1.0
    if source == "lookup":
        assert 0 < stats.acceptance_rate < 1  # rows accept different counts


def test_stop_tokens_and_budgets_end_rows_mid_step():
    model = tiny_model()
    free = greedy(model, PROMPTS + REPEATS, 15, 64).tokens
    stop = free[0][5]
    plain = greedy(model, PROMPTS + REPEATS, 15, 64, stop_ids=[stop])
    for spec in (Speculation(4, lookup_ngram=2), Speculation(4, draft=tiny_model())):
        gen = Generator(model, speculation=spec)
        gen.setup(len(PROMPTS + REPEATS), 64)
        res = gen.generate(PROMPTS + REPEATS, 15, Sampling(), stop_ids=[stop])
        assert res.tokens == plain.tokens and res.stopped == plain.stopped


@pytest.mark.parametrize("source", ["lookup", "draft-self"])
def test_chat_turns_continue_with_speculation(source):
    """continue_sequence through speculative steps: each turn equals plain greedy over the transcript
    (the draft's cache, missing the last guess after an all-accepted step, is caught up)."""
    model = tiny_model()
    gen = Generator(model, speculation=SOURCES[source]())
    gen.setup(1, 256)
    transcript = []
    for turn in ([5, 6, 7, 8], [5, 6, 7], [60, 1, 7, 5, 6]):
        res = gen.generate([turn], 12, Sampling(), continue_sequence=True)
        transcript += turn
        assert res.tokens == greedy(model, [transcript], 12, 256).tokens
        transcript += res.tokens[0]


def test_lookup_guesses_what_followed_the_latest_match():
    history = torch.tensor([[9, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 0, 0, 0]])  # the last token (slot 10) is 2
    pos, start = torch.tensor([10]), torch.tensor([0])
    # "1 2" last occurred at slots 5-6, followed by 5 6 1 2, then past the text: the last token again
    assert propose_by_lookup(history, pos, start, 2, 6).tolist() == [[5, 6, 1, 2, 2, 2]]
    # a 3-gram "x 1 2" is longer: "4 1 2"? no; "6 1 2"? only at the end: falls back to the 2-gram
    assert propose_by_lookup(history, pos, start, 3, 2).tolist() == [[5, 6]]
    # a row's text starts at its row start: the match at slots 1-2 is left padding for this row
    assert propose_by_lookup(history, torch.tensor([6]), torch.tensor([3]), 2, 2).tolist() == [[2, 2]]


def test_accept_rule_greedy_and_bonus():
    target = torch.tensor([[[0.0, 5, 1], [0, 1, 5], [5, 0, 1]]])  # argmax 1, 2, 0
    tokens, n = accept(target, torch.tensor([[1, 0]]), None, greedy=True)
    assert n.tolist() == [1] and tokens[0, :2].tolist() == [1, 2]  # the first guess stands, then the fix
    tokens, n = accept(target, torch.tensor([[1, 2]]), None, greedy=True)
    assert n.tolist() == [2] and tokens[0].tolist() == [1, 2, 0]  # both stand, then the bonus token


def exact_distribution(model, prompt, n, sampling):
    """P(x1..xn | prompt) of plain sampling, for every sequence of n tokens (tiny vocabulary)."""
    V = model.args.vocab_size
    seqs = list(itertools.product(range(V), repeat=n))
    model.setup_caches(len(seqs), len(prompt) + n)
    ids = torch.tensor([prompt + list(s) for s in seqs])
    with torch.no_grad():
        probs = sampling_probs(model(ids, torch.arange(ids.shape[1]))[:, len(prompt) - 1 : -1], sampling)
    picked = probs.gather(-1, ids[:, len(prompt) :].unsqueeze(-1)).squeeze(-1)  # [seqs, n]
    return dict(zip(seqs, picked.prod(-1).tolist()))


@pytest.mark.parametrize(
    "source, sampling",
    [
        ("draft", Sampling(temperature=1.0)),
        ("draft", Sampling(temperature=0.7, top_k=3)),
        ("lookup", Sampling(temperature=1.0, top_p=0.9)),
    ],
)
def test_sampling_keeps_the_target_distribution(source, sampling):
    """8000 independent rows of one batch, 3 new tokens each (the first from prefill, the other two
    from one speculative step of k = 2 that accepts, rejects and resamples): the empirical
    distribution over all 4^3 = 64 sequences is within total variation 0.06 of the exact one.
    Sampling error alone gives about 0.036 here (64 outcomes of p ~ 1/64); keeping the draft
    model's guesses without the rule would give 0.27 (temperature 1)."""
    V, n, rows, bound = 4, 3, 8000, 0.06
    model, other = tiny_model(vocab_size=V), tiny_model(seed=1, vocab_size=V)
    with torch.no_grad():  # soft distributions: every sequence likely enough to count
        model.output.weight.mul_(0.05)
        other.output.weight.mul_(0.05)
    prompt = [1, 2, 1, 2, 1]
    spec = Speculation(2, draft=other) if source == "draft" else Speculation(2, lookup_ngram=2)
    torch.manual_seed(0)
    res = speculative(model, [prompt] * rows, n, len(prompt) + n + 1, spec, sampling)
    stats = res.speculation
    assert 0 < stats.accepted < stats.k * stats.verify_steps  # guesses both stood and fell
    exact = exact_distribution(model, prompt, n, sampling)
    counts = {}
    for row in res.tokens:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    tv = 0.5 * sum(abs(counts.get(s, 0) / rows - p) for s, p in exact.items())
    assert sum(counts.get(s, 0) for s in exact) == rows
    assert tv < bound, tv


def test_a_speculated_run_continues_where_the_cache_allows():
    model = tiny_model()
    p = PROMPTS[0]
    plain = greedy(model, [p], 40 - len(p) - 3, 64).tokens
    gen = Generator(model, speculation=Speculation(4, lookup_ngram=2))
    gen.setup(1, 40)
    full = gen.generate([p], 40 - len(p) - 3, Sampling())  # prompt + new + k - 1 == every slot
    assert full.tokens == plain
    with pytest.raises(UsageError, match="speculate k = 4"):
        gen.generate([p], 40 - len(p) - 2, Sampling())


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_position_embeddings=256)


def test_cli_prompt_lookup_and_draft_equal_plain_and_report(tiny_checkpoint, tmp_path, capsys):
    base = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--temperature", 0, "--max-new-tokens", 30]
    base += ["--prompt", "the cat sat on the mat. the cat sat on", "--prompt", "Hello"]
    runs = {}
    for name, extra in {
        "plain": [],
        "lookup": ["--prompt-lookup", 3, "--speculate-k", 6],
        "draft": ["--draft-checkpoint", tiny_checkpoint],
    }.items():
        code, out, err = run_main(base + extra + ["--json", tmp_path / f"{name}.json"], capsys)
        assert code == 0, err
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        if name != "plain":
            assert "Speculation:" in err and "tokens per verify step" in err
    for name in ("lookup", "draft"):
        assert [r["token_ids"] for r in runs[name]["rows"]] == [r["token_ids"] for r in runs["plain"]["rows"]]
    assert runs["plain"]["speculation"] is None
    assert runs["draft"]["speculation"]["acceptance_rate"] == 1.0  # the draft is the target itself
    assert runs["lookup"]["speculation"]["speculate_k"] == 6


def test_cli_chat_with_prompt_lookup(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import io

    def chat(extra, name):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hi!\nWhat is 2+2?\n"))
        code, out, err = run_main(
            ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--chat", "--temperature", 0]
            + ["--max-new-tokens", 8, "--json", tmp_path / name]
            + extra,
            capsys,
        )
        assert code == 0, err
        return json.loads((tmp_path / name).read_text())["turns"]

    plain, looked_up = chat([], "plain.json"), chat(["--prompt-lookup", 2], "lookup.json")
    assert [t["reply_ids"] for t in looked_up] == [t["reply_ids"] for t in plain]
    assert all(t["speculation"]["verify_steps"] > 0 for t in looked_up)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-lookup", 2, "--speculate-k", 0], "--speculate-k must be at least 1 (got 0)"),
        (["--speculate-k", 3], "--speculate-k needs a source of guesses"),
        (["--prompt-lookup", 0], "--prompt-lookup must be at least 1"),
        (["--prompt-lookup", 2, "--draft-checkpoint", "x"], "--prompt-lookup and --draft-checkpoint"),
        (["--prompt-lookup", 2, "--speculate-k", 8, "--max-seq-length", 25], "--speculate-k 8 needs 7 cache slots"),
    ],
)
def test_bad_speculation_flags_are_one_line_exit_2(tiny_checkpoint, capsys, extra, message):
    code, out, err = run_main(
        ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", 20] + extra, capsys
    )
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after "Loaded ..." at most
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_draft_with_another_vocabulary_or_tokenizer_is_refused(tiny_checkpoint, tmp_path, capsys):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    args = ModelArgs(**{**config["model_args"], "vocab_size": 49160})
    other = tmp_path / "other-vocab"
    save_checkpoint(other, {"model_args": asdict(args), "quantization": None}, Transformer(args).state_dict(), {})
    for f in tiny_checkpoint.iterdir():
        if f.name.startswith("tokenizer"):
            (other / f.name).write_bytes(f.read_bytes())
    common = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", 4]
    code, out, err = run_main(common + ["--draft-checkpoint", other], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "vocabulary has 49160 ids, the target's 49152" in err
    # the same model with one token renamed in its tokenizer
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in tiny_checkpoint.iterdir():
        (renamed / f.name).write_bytes(f.read_bytes())
    tok = json.loads((renamed / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (1000, 1001))
    vocab[a], vocab[b] = 1001, 1000  # two ids swapped: merges still hold, the ids no longer match
    (renamed / "tokenizer.json").write_text(json.dumps(tok))
    code, out, err = run_main(common + ["--draft-checkpoint", renamed], capsys)
    assert code == 2 and "tokenizer differs from the target's (id 1000" in err, err


# ----------------------------------------------------------------------------- the real SmolLM2

PASSAGE = (
    "Repeat the following passage exactly.\n\nThe old lighthouse stood at the edge of the cliff for more than "
    "two hundred years. Every night its keeper climbed the narrow stairs, trimmed the wick and polished the "
    "great lens until it shone. Ships passing in the dark saw its beam sweep across the water."
)


def test_smollm2_prompt_lookup_is_plain_greedy_and_accepts_most(smollm2_checkpoint):
    from tokenizer import load_tokenizer

    model, _ = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(smollm2_checkpoint)
    prompt = tok.encode_dialog([{"role": "user", "content": PASSAGE}])
    plain = greedy(model, [prompt], 48, 256).tokens
    res = speculative(model, [prompt], 48, 256, Speculation(6, lookup_ngram=3))
    assert res.tokens == plain
    assert res.speculation.acceptance_rate > 0.6, res.speculation.as_dict()


# ----------------------------------------------------------------------------- GPU (python -m pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "cuda-graph"])
def test_cuda_speculation_equals_cpu_plain_greedy(compile):
    torch._dynamo.reset()
    cpu = tiny_model(vocab_size=512, dim=128, n_heads=4, n_kv_heads=2, head_dim=32)
    prompts = PROMPTS + REPEATS
    plain = greedy(cpu, prompts, 30, 128).tokens

    def cuda_copy(seed):
        m = tiny_model(seed=seed, vocab_size=512, dim=128, n_heads=4, n_kv_heads=2, head_dim=32)
        return m.to("cuda")

    model = cuda_copy(0)
    for spec in (
        Speculation(4, lookup_ngram=3),
        Speculation(4, draft=cuda_copy(0)),
        Speculation(3, draft=cuda_copy(1)),
    ):
        batch = speculative(model, prompts, 30, 128, spec, compile=compile)
        assert batch.tokens == plain
        assert speculative(model, prompts[-1:], 30, 128, spec, compile=compile).tokens[0] == plain[-1]
    torch._dynamo.reset()


@pytest.mark.parametrize("source", ["lookup", "draft-other"])
def test_a_vocab_padded_past_the_tokenizer_is_never_sampled(source):
    # Only ids below Sampling.vocab_size are chosen (a model padded past its tokenizer, as
    # Qwen2.5's 151936 rows for 151665 ids): plain and speculative, greedy and sampled.
    model = tiny_model()
    prompts = [[t % 60 for t in p] for p in PROMPTS]  # a tokenizer's ids are all below its vocab
    with torch.no_grad():
        model.output.weight[60:] *= 4  # the padded rows would win most steps
    assert any(t >= 60 for row in greedy(model, prompts, 12, 64).tokens for t in row)  # unless limited
    plain = Generator(model)
    plain.setup(len(prompts), 64)
    want = plain.generate(prompts, 12, Sampling(vocab_size=60)).tokens
    assert all(t < 60 for row in want for t in row)
    assert speculative(model, prompts, 12, 64, SOURCES[source](), Sampling(vocab_size=60)).tokens == want
    torch.manual_seed(0)
    sampled = speculative(model, prompts, 12, 64, SOURCES[source](), Sampling(temperature=1.0, vocab_size=60)).tokens
    assert all(t < 60 for row in sampled for t in row)
