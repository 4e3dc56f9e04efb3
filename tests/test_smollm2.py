"""End to end on the real SmolLM2-135M-Instruct (converted from its GGUF): it answers, and a chat
kept in the KV cache equals re-running the transcript from an empty cache."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from generate import Generator, Sampling, load_model
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
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint", str(smollm2_checkpoint),
                           "--device", "cpu", "--chat", "--temperature", "0", "--max-new-tokens", "24",
                           "--json", str(out_json)],
                          input="\n".join(turns) + "\n/exit\n", capture_output=True, text=True, timeout=300)
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
