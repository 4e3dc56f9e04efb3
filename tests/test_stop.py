"""Stop strings: the StopStrings matcher against plain str.find on the whole text, whatever the
piece boundaries, and the Generator hook that ends a row when on_token returns True."""

import random

import pytest
import torch

from generate import Generator, Sampling
from model import ModelArgs, Transformer
from tokenizer import StopStrings


def run_pieces(stops, pieces):
    cutter = StopStrings(stops)
    shown = "".join(cutter.push(p) for p in pieces) + cutter.flush()
    return shown, cutter


def expected_cut(stops, pieces):
    """The reference, by brute force: after each piece look for the stops in all the text so far;
    at the first piece that brings one, cut before the earliest occurrence of any."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [(text.find(s), i) for i, s in enumerate(stops) if s in text]
        if hits:
            at, which = min(hits)
            return text[:at], stops[which]
    return text, None


@pytest.mark.parametrize(
    "stops,pieces,text,fired",
    [
        (["\n"], ["Hello", " world", "\nmore"], "Hello world", "\n"),
        (["Question:"], ["4", "\n\nQue", "st", "ion: next"], "4\n\n", "Question:"),  # across three pieces
        (["abcd", "c"], ["ab", "c", "d"], "ab", "c"),  # the first stop to appear ends it
        (["cd", "bcd"], ["ab", "cd"], "a", "bcd"),  # both complete together: the earlier start wins
        (["###"], ["#", "#", " not a stop"], "## not a stop", None),  # a held-back tail that came to nothing
        (["<|im_end|>"], ["ok<|im_", "end|>"], "ok", "<|im_end|>"),
        (["."], ["", "", "."], "", "."),
        ([], ["anything", " at all"], "anything at all", None),
    ],
)
def test_stop_strings_cases(stops, pieces, text, fired):
    shown, cutter = run_pieces(stops, pieces)
    assert (shown, cutter.fired) == (text, fired) == expected_cut(stops, pieces)
    assert cutter.text == text
    if fired:
        assert cutter.push("more") == ""  # nothing is shown after a stop


def test_stop_strings_match_find_on_random_splits():
    rng = random.Random(0)
    alphabet = "ab\n."
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        cutter = StopStrings(stops)
        shown = ""
        for piece in pieces:
            shown += cutter.push(piece)
            # what is shown never runs into a stop string that is still forming
            assert not any(s in shown for s in stops)
        shown += cutter.flush()
        assert (shown, cutter.fired) == expected_cut(stops, pieces), (stops, pieces)


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        StopStrings(["ok", ""])


@torch.no_grad()
def test_on_token_true_ends_only_that_row():
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=128,
        )
    ).eval()
    gen = Generator(model)
    gen.setup(2, 64)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    full = gen.generate(prompts, 10, Sampling())
    seen = [[], []]

    def on_token(row, token_id):
        seen[row].append(token_id)
        return row == 0 and len(seen[0]) == 3  # row 0 stops after 3 tokens, row 1 runs on

    cut = gen.generate(prompts, 10, Sampling(), on_token=on_token)
    assert cut.tokens[0] == full.tokens[0][:3] and seen[0] == cut.tokens[0]
    assert cut.tokens[1] == full.tokens[1] and len(cut.tokens[1]) == 10
    assert cut.stopped == [False, False]  # `stopped` still means "ended at a stop token"
