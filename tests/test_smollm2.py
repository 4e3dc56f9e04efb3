"""End to end on the real SmolLM2-135M-Instruct (converted from its GGUF): it answers, and a chat
kept in the KV cache equals re-running the transcript from an empty cache."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from checkpoint import load_model
from generate import Generator, Sampling
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_capital_of_france_is_paris(smollm2_checkpoint):
    model, _ = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(smollm2_checkpoint)
    gen = Generator(model)
    gen.setup(1, 128)
    ids = tok.encode_dialog([{"role": "user", "content": "What is the capital of France?"}])
    res = gen.generate([ids], 30, Sampling(), tok.stop_ids)
    assert "Paris" in tok.decode(res.tokens[0])


def test_three_turn_chat_equals_rerun_from_empty_cache(smollm2_checkpoint, tmp_path):
    turns = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]
    out_json = tmp_path / "chat.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            "--checkpoint",
            str(smollm2_checkpoint),
            "--device",
            "cpu",
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--json",
            str(out_json),
        ],
        input="\n".join(turns) + "\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    replies = json.loads(out_json.read_text())["turns"]
    assert "Paris" in replies[0]["reply"] and "Rome" in replies[1]["reply"]

    model, _ = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(smollm2_checkpoint)
    gen = Generator(model)
    gen.setup(1, 512)
    transcript = []
    for i, (user, chat_turn) in enumerate(zip(turns, replies)):
        transcript += tok.encode_chat_turn(user, first_turn=i == 0)
        res = gen.generate([transcript], 24, Sampling(), tok.stop_ids)  # from an empty cache
        assert res.tokens[0] == chat_turn["reply_ids"], f"turn {i}"
        transcript += res.tokens[0] + tok.encode_reply("")


def test_chat_in_a_real_terminal(smollm2_checkpoint):
    """Drive --chat through a tmux pane (a real tty): prompt, streamed replies, /reset, Ctrl-C, Ctrl-D."""
    import shutil
    import time
    import uuid

    import pytest

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"chat-{uuid.uuid4().hex[:8]}"
    cmd = (
        f"{sys.executable} {REPO / 'generate.py'} --checkpoint {smollm2_checkpoint} --device cpu --chat "
        f"--temperature 0 --max-new-tokens 400; echo EXIT=$?; sleep 60"
    )
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "50", cmd], check=True)

    def pane():  # -J: lines the pane wrapped come back whole
        return subprocess.run(
            ["tmux", "capture-pane", "-J", "-t", session, "-p"], capture_output=True, text=True
        ).stdout

    def wait_for(text, timeout=120, count=1):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pane().count(text) >= count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{text!r} never appeared:\n{pane()}")

    def send(*keys):
        subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True)

    try:
        wait_for("Ctrl-D ends")  # capture-pane trims the prompt's trailing space; typed keys wait in the tty
        send("What is the capital of France?", "Enter")
        wait_for("Paris")
        send("/reset", "Enter")
        wait_for("(conversation reset)")
        # Ctrl-C typed in the terminal (SIGINT to the foreground process group) stops a long reply
        send("Write a long story about a dragon.", "Enter")
        time.sleep(3)  # some of the 400 tokens (tens of seconds) are out
        send("C-c")
        wait_for("(reply stopped")
        send("/reset", "Enter")  # the chat goes on
        send("What is the capital of France?", "Enter")
        wait_for("Paris", count=2)
        send("C-d")
        wait_for("EXIT=0")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_botchan_perplexity_is_pinned(smollm2_checkpoint):
    """The number in README.md: SmolLM2-135M-Instruct (from the Q4_1 GGUF, fp32 on CPU) on the first
    4096 tokens of Botchan, windows of 1024."""
    from scripts.perplexity import botchan_ids, evaluate

    ids = botchan_ids(load_tokenizer(smollm2_checkpoint), 4096)
    result = evaluate(smollm2_checkpoint, ids, window=1024)
    assert result["tokens"] == 4092
    assert abs(result["perplexity"] - 30.117) < 0.01, result


def test_readme_chat_demo_builds_on_the_first_reply(smollm2_checkpoint, monkeypatch, capsys):
    """README.md's chat demo, as written there: greedy, the second answer needs the first."""
    import io
    import re

    import generate

    readme = (REPO / "README.md").read_text()
    piped = re.search(r"printf '(.*?)' \| python generate.py --chat --temperature 0 --max-new-tokens 60", readme)
    assert piped, "the chat demo is gone from README.md"
    monkeypatch.setattr(sys, "stdin", io.StringIO(piped.group(1).replace("\\n", "\n")))
    assert (
        generate.main(
            [
                "--checkpoint",
                str(smollm2_checkpoint),
                "--device",
                "cpu",
                "--chat",
                "--temperature",
                "0",
                "--max-new-tokens",
                "60",
            ]
        )
        == 0
    )
    replies = capsys.readouterr().out.splitlines()
    assert "\n".join(replies) in readme  # the README shows exactly what the model says
    assert "Paris" in replies[0] and "Eiffel Tower" in replies[1], replies


def test_fused_decode_path_answers_as_the_plain_one(smollm2_checkpoint, reference_decode_kernels):
    """The batch-1 path a GPU takes by default for this model (gemv.DecodeBlock: 576 wide, so fused;
    the tied output projection stays F.linear), run with the kernels' references: the real
    model's greedy answer is the plain path's, token for token, and every layer went through it."""
    import gemv

    model, _ = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(smollm2_checkpoint)
    ids = tok.encode_dialog([{"role": "user", "content": "What is the capital of France?"}])
    gen = Generator(model)
    gen.setup(1, 128)
    plain = gen.generate([ids], 20, Sampling(), tok.stop_ids).tokens
    calls, rope_calls = reference_decode_kernels()
    gen = Generator(model)
    gen.setup(1, 160)  # a new length: new caches (SplitKVCache or not, as the plain run had)
    assert all(type(layer) is gemv.DecodeBlock for layer in model.layers)
    fused = gen.generate([ids], 20, Sampling(), tok.stop_ids).tokens
    assert fused == plain and "Paris" in tok.decode(fused[0])
    # every decode step, every layer: one rope_write_kv and four GEMVs (the stop token's step included)
    steps = rope_calls.item() // model.args.n_layers
    assert steps >= len(fused[0]) - 1 and rope_calls == steps * model.args.n_layers and calls == 4 * rope_calls
