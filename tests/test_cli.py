"""generate.py as a user runs it: flags, streaming, --json, and one-line errors with exit code 2."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import generate
from model import ModelArgs, Transformer, save_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model with the real SmolLM2 tokenizer (from its GGUF)."""
    import gguf

    from scripts.assets import smollm2_gguf_path
    from tokenizer import gguf_tokenizer_files

    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=49152,
                     max_position_embeddings=256, tie_embeddings=True)
    model = Transformer(args)
    files = gguf_tokenizer_files(gguf.GGUFReader(str(smollm2_gguf_path())))
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(out, {"model_args": asdict(args), "quantization": None}, model.state_dict(), files)
    return out


def run_main(argv, capsys):
    code = generate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generates_streams_and_writes_json(tiny_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_main(["--checkpoint", tiny_checkpoint, "--prompt", "Hello there", "--max-new-tokens", 12,
                               "--temperature", 0, "--device", "cpu", "--json", out_json], capsys)
    assert code == 0, err
    data = json.loads(out_json.read_text())
    row = data["rows"][0]
    assert row["prompt"] == "Hello there"
    # SmolLM2's config says add_bos_token: false (its bos is <|im_start|>): the prompt is the bare text
    from tokenizer import load_tokenizer
    assert row["prompt_ids"] == load_tokenizer(tiny_checkpoint).encode("Hello there")
    assert len(row["token_ids"]) == 12 or row["stopped"]
    # what was streamed is the prompt followed by exactly the decoded completion
    assert out == "Hello there" + row["completion"] + "\n"
    for key in ("time_to_first_token_s", "decode_tokens_per_s", "model_bytes", "achieved_GBps",
                "peak_memory_bytes", "torch_version", "device"):
        assert data[key] is not None, key
    assert "tokens/s" in err and "Bandwidth achieved" in err


def test_batch_of_prompts_matches_each_alone(tiny_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", tiny_checkpoint, "--max-new-tokens", 8, "--temperature", 0, "--device", "cpu"]
    prompts = ["A short one", "A much longer prompt than the first, with more tokens in it"]
    batch_json, alone_json = tmp_path / "b.json", tmp_path / "a.json"
    assert run_main(common + ["--prompt", prompts[0], "--prompt", prompts[1], "--json", batch_json], capsys)[0] == 0
    batch = json.loads(batch_json.read_text())["rows"]
    for i, p in enumerate(prompts):
        assert run_main(common + ["--prompt", p, "--json", alone_json], capsys)[0] == 0
        assert json.loads(alone_json.read_text())["rows"][0]["token_ids"] == batch[i]["token_ids"]


def test_sampling_with_seed_is_reproducible(tiny_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", tiny_checkpoint, "--prompt", "Once", "--max-new-tokens", 10, "--temperature", 1.0,
              "--top-p", 0.9, "--top-k", 50, "--seed", 7, "--device", "cpu", "--json"]
    assert run_main(common + [tmp_path / "1.json"], capsys)[0] == 0
    assert run_main(common + [tmp_path / "2.json"], capsys)[0] == 0
    ids = [json.loads((tmp_path / f"{i}.json").read_text())["rows"][0]["token_ids"] for i in (1, 2)]
    assert ids[0] == ids[1]


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
    (["--dtype", "fp12"], "unknown --dtype 'fp12'"),
    (["--kv-cache-dtype", "int3"], "unknown --kv-cache-dtype 'int3'"),
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "word " * 300], "exceeds"),  # longer than the model's 256-token context
    (["--max-seq-length", "100000"], "exceeds the model's context"),
    (["--prompt", "hi", "--max-seq-length", "8", "--max-new-tokens", "20"], "exceeds --max-seq-length"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
])
def test_bad_input_is_one_line_exit_2(tiny_checkpoint, capsys, extra, message):
    argv = ["--checkpoint", tiny_checkpoint, "--device", "cpu"] + extra
    if "--prompt" not in extra and "--prompt-file" not in extra:
        argv += ["--prompt", "hi"]
    code, out, err = run_main(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_bad_checkpoints(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_main(["--checkpoint", tmp_path / "missing", "--device", "cpu"], capsys)
    assert code == 2 and "does not exist" in err
    # a weight whose shape does not match the config: named, with both shapes
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(tiny_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_args"]["intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(["--checkpoint", bad, "--device", "cpu", "--prompt", "x"], capsys)
    assert code == 2 and "layers.0.feed_forward.w13.weight" in err and "[128, 32]" in err and "[96, 32]" in err
    # a checkpoint without its tokenizer file
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_checkpoint, no_tok)
    (no_tok / "tokenizer.json").unlink()
    code, _, err = run_main(["--checkpoint", no_tok, "--device", "cpu", "--prompt", "x"], capsys)
    assert code == 2 and "no tokenizer" in err and str(no_tok) in err and len(err.strip().splitlines()) == 1
    # a truncated weights file
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_main(["--checkpoint", trunc, "--device", "cpu", "--prompt", "x"], capsys)
    assert code == 2 and "model.safetensors" in err


def test_cli_process_exit_code_and_no_traceback(tiny_checkpoint):
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint", str(tiny_checkpoint),
                           "--device", "cpu", "--top-p", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --top-p must be in (0, 1] (got 2.0)"]


def test_chat_keeps_the_conversation_in_the_cache(tiny_checkpoint, tmp_path):
    """Three piped turns; each reply equals a fresh run over the whole transcript (greedy)."""
    turns = ["Hi!", "What is 2+2?", "Thanks"]
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "--checkpoint", str(tiny_checkpoint),
                           "--device", "cpu", "--chat", "--temperature", "0", "--max-new-tokens", "6",
                           "--json", str(tmp_path / "chat.json")],
                          input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = json.loads((tmp_path / "chat.json").read_text())["turns"]
    assert [r["user"] for r in replies] == turns
    assert "".join(r["reply"] + "\n" for r in replies) == proc.stdout  # streamed as generated

    from generate import Generator, Sampling, load_model
    from tokenizer import load_tokenizer
    model, _ = load_model(tiny_checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(tiny_checkpoint)
    gen = Generator(model)
    gen.setup(1, 256)
    transcript = []  # the ids the conversation put in the cache, re-run from an empty cache each turn
    for i, (user, streamed) in enumerate(zip(turns, replies)):
        transcript += tok.encode_chat_turn(user, first_turn=i == 0)
        res = gen.generate([transcript], 6, Sampling(), tok.stop_ids)
        assert streamed["reply_ids"] == res.tokens[0], f"turn {i}"
        # the reply and its stop token (added by the chat when the reply was cut) stay in the cache
        transcript += res.tokens[0] + tok.encode_reply("")


def test_profile_prompt_file_and_num_samples(tiny_checkpoint, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("A prompt read from a file")
    trace = tmp_path / "trace.json"
    code, out, err = run_main(["--checkpoint", tiny_checkpoint, "--prompt-file", prompt, "--max-new-tokens", 4,
                               "--num-samples", 2, "--temperature", 0, "--device", "cpu", "--profile", trace], capsys)
    assert code == 0, err
    assert out.count("A prompt read from a file") == 2  # two samples streamed
    assert "Sample 2/2" in err
    assert "traceEvents" in json.loads(trace.read_text())


def test_compile_prefill_equals_eager(tiny_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", tiny_checkpoint, "--prompt", "Compile me", "--max-new-tokens", 5,
              "--temperature", 0, "--device", "cpu", "--json"]
    assert run_main(common + [tmp_path / "e.json"], capsys)[0] == 0
    assert run_main(common + [tmp_path / "c.json", "--compile-prefill"], capsys)[0] == 0
    ids = [json.loads((tmp_path / f"{n}.json").read_text())["rows"][0]["token_ids"] for n in "ec"]
    assert ids[0] == ids[1]


def test_int4_compile_on_cpu_needs_bf16(tiny_checkpoint, tmp_path, capsys):
    from quantize import quantize_checkpoint
    int4 = quantize_checkpoint(tiny_checkpoint, "int4", 32, output_dir=tmp_path / "int4")
    code, _, err = run_main(["--checkpoint", int4, "--device", "cpu", "--compile", "--prompt", "x"], capsys)
    assert code == 2 and "needs --dtype bf16" in err
    # eager int4 runs in fp32 compute
    code, _, err = run_main(["--checkpoint", int4, "--device", "cpu", "--prompt", "x", "--max-new-tokens", 3], capsys)
    assert code == 0, err


def test_stop_strings_end_rows_and_are_not_printed(tiny_checkpoint, tmp_path, capsys):
    """--stop cuts each row at the first occurrence of a stop in its decoded text, across token
    boundaries: the reference is the unstopped completion cut with str.find."""
    common = ["--checkpoint", tiny_checkpoint, "--max-new-tokens", 16, "--temperature", 0, "--device", "cpu",
              "--json"]
    prompts = ["Hello there", "A much longer prompt than the first one"]
    assert run_main(common + [tmp_path / "free.json", "--prompt", prompts[0], "--prompt", prompts[1]], capsys)[0] == 0
    free = json.loads((tmp_path / "free.json").read_text())["rows"]
    # a stop string made of the end of one token and the start of the next, taken from row 0's text
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_checkpoint)
    first, second = tok.decode(free[0]["token_ids"][2:3]), tok.decode(free[0]["token_ids"][3:4])
    stop = first[-1:] + second[:1]
    assert run_main(common + [tmp_path / "stop.json", "--prompt", prompts[0], "--prompt", prompts[1],
                              "--stop", stop, "--stop", "zzzz-never"], capsys)[0] == 0
    rows = json.loads((tmp_path / "stop.json").read_text())["rows"]
    for row, reference in zip(rows, free):
        text = reference["completion"]
        if stop in text:
            assert row["completion"] == text[:text.find(stop)] and row["stop_string"] == stop
            assert len(row["token_ids"]) < 16  # the row ended early
        else:
            assert row["completion"] == text and row["stop_string"] is None
    assert rows[0]["stop_string"] == stop
    # streamed (one prompt): the stop string is not printed
    code, out, _ = run_main(common + [tmp_path / "one.json", "--prompt", prompts[0], "--stop", stop], capsys)
    assert code == 0 and out == prompts[0] + rows[0]["completion"] + "\n"


def test_empty_stop_string_is_one_line_error(tiny_checkpoint, capsys):
    code, _, err = run_main(["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "hi", "--stop", ""], capsys)
    assert code == 2 and err.strip().splitlines() == ['error: --stop "" would stop before the first token; give some text']
