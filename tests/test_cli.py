"""generate.py as a user runs it: flags, streaming, --json, and one-line errors with exit code 2."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import generate
from checkpoint import save_checkpoint
from model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parent.parent


def make_tiny_checkpoint(out: Path, max_position_embeddings: int) -> Path:
    """A tiny random model with the real SmolLM2 tokenizer (from its GGUF)."""
    import gguf

    from scripts.assets import smollm2_gguf_path
    from tokenizer import gguf_tokenizer_files

    torch.manual_seed(0)
    args = ModelArgs(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=64,
        vocab_size=49152,
        max_position_embeddings=max_position_embeddings,
        tie_embeddings=True,
    )
    model = Transformer(args)
    files = gguf_tokenizer_files(gguf.GGUFReader(str(smollm2_gguf_path())))
    save_checkpoint(out, {"model_args": asdict(args), "quantization": None}, model.state_dict(), files)
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_position_embeddings=256)


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """The tiny model with a 4096-token context: its thousands of greedy tokens (it never stops on
    its own) take long enough on the CPU for a test to press Ctrl-C mid-generation."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "long", max_position_embeddings=4096)


def run_main(argv, capsys):
    code = generate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generates_streams_and_writes_json(tiny_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_main(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            12,
            "--temperature",
            0,
            "--device",
            "cpu",
            "--json",
            out_json,
        ],
        capsys,
    )
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
    for key in (
        "time_to_first_token_s",
        "decode_tokens_per_s",
        "model_bytes",
        "achieved_GBps",
        "peak_memory_bytes",
        "torch_version",
        "device",
    ):
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
    common = [
        "--checkpoint",
        tiny_checkpoint,
        "--prompt",
        "Once",
        "--max-new-tokens",
        10,
        "--temperature",
        1.0,
        "--top-p",
        0.9,
        "--top-k",
        50,
        "--seed",
        7,
        "--device",
        "cpu",
        "--json",
    ]
    assert run_main(common + [tmp_path / "1.json"], capsys)[0] == 0
    assert run_main(common + [tmp_path / "2.json"], capsys)[0] == 0
    ids = [json.loads((tmp_path / f"{i}.json").read_text())["rows"][0]["token_ids"] for i in (1, 2)]
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    "extra,message",
    [
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
        (["--compile", "--compile-blocks"], "--compile-blocks replaces --compile"),
        (["--compile-blocks", "--prompt-lookup", "2"], "--compile-blocks does not compile speculative steps"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_checkpoint, capsys, extra, message):
    argv = ["--checkpoint", tiny_checkpoint, "--device", "cpu"] + extra
    if "--prompt" not in extra and "--prompt-file" not in extra:
        argv += ["--prompt", "hi"]
    code, out, err = run_main(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_unwritable_outputs_fail_before_the_model_loads(tiny_checkpoint, tmp_path, capsys):
    """--json / --profile that cannot be written (a directory, a path under a file) are one-line errors
    before anything loads or generates: not a traceback after the whole run. A new folder is fine."""
    (tmp_path / "file").write_text("x")
    for extra, message in (
        (["--json", str(tmp_path)], "is a directory"),
        (["--json", str(tmp_path / "file" / "r.json")], "cannot write under"),
        (["--profile", str(tmp_path / "file" / "deeper" / "trace.json")], "cannot write under"),
    ):
        code, out, err = run_main(
            ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "hi"] + extra, capsys
        )
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0] and extra[0] in lines[0], err
        assert not out and "Loaded" not in err  # nothing ran
    argv = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"]
    assert run_main(argv + ["--json", str(tmp_path / "new" / "sub" / "r.json")], capsys)[0] == 0
    assert json.loads((tmp_path / "new" / "sub" / "r.json").read_text())["rows"]


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
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--top-p",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --top-p must be in (0, 1] (got 2.0)"]


def test_chat_keeps_the_conversation_in_the_cache(tiny_checkpoint, tmp_path):
    """Three piped turns; each reply equals a fresh run over the whole transcript (greedy)."""
    turns = ["Hi!", "What is 2+2?", "Thanks"]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "--json",
            str(tmp_path / "chat.json"),
        ],
        input="\n".join(turns) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    replies = json.loads((tmp_path / "chat.json").read_text())["turns"]
    assert [r["user"] for r in replies] == turns
    assert "".join(r["reply"] + "\n" for r in replies) == proc.stdout  # streamed as generated

    from checkpoint import load_model
    from generate import Generator, Sampling
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
    code, out, err = run_main(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--prompt-file",
            prompt,
            "--max-new-tokens",
            4,
            "--num-samples",
            2,
            "--temperature",
            0,
            "--device",
            "cpu",
            "--profile",
            trace,
        ],
        capsys,
    )
    assert code == 0, err
    assert out.count("A prompt read from a file") == 2  # two samples streamed
    assert "Sample 2/2" in err
    assert "traceEvents" in json.loads(trace.read_text())


def test_compile_prefill_equals_eager(tiny_checkpoint, tmp_path, capsys):
    common = [
        "--checkpoint",
        tiny_checkpoint,
        "--prompt",
        "Compile me",
        "--max-new-tokens",
        5,
        "--temperature",
        0,
        "--device",
        "cpu",
        "--json",
    ]
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
    common = ["--checkpoint", tiny_checkpoint, "--max-new-tokens", 16, "--temperature", 0, "--device", "cpu", "--json"]
    prompts = ["Hello there", "A much longer prompt than the first one"]
    assert run_main(common + [tmp_path / "free.json", "--prompt", prompts[0], "--prompt", prompts[1]], capsys)[0] == 0
    free = json.loads((tmp_path / "free.json").read_text())["rows"]
    # a stop string made of the end of one token and the start of the next, taken from row 0's text
    from tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    first, second = tok.decode(free[0]["token_ids"][2:3]), tok.decode(free[0]["token_ids"][3:4])
    stop = first[-1:] + second[:1]
    assert (
        run_main(
            common
            + [
                tmp_path / "stop.json",
                "--prompt",
                prompts[0],
                "--prompt",
                prompts[1],
                "--stop",
                stop,
                "--stop",
                "zzzz-never",
            ],
            capsys,
        )[0]
        == 0
    )
    rows = json.loads((tmp_path / "stop.json").read_text())["rows"]
    for row, reference in zip(rows, free):
        text = reference["completion"]
        if stop in text:
            assert row["completion"] == text[: text.find(stop)] and row["stop_string"] == stop
            assert len(row["token_ids"]) < 16  # the row ended early
        else:
            assert row["completion"] == text and row["stop_string"] is None
    assert rows[0]["stop_string"] == stop
    # streamed (one prompt): the stop string is not printed
    code, out, _ = run_main(common + [tmp_path / "one.json", "--prompt", prompts[0], "--stop", stop], capsys)
    assert code == 0 and out == prompts[0] + rows[0]["completion"] + "\n"


def test_empty_stop_string_is_one_line_error(tiny_checkpoint, capsys):
    code, _, err = run_main(
        ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "hi", "--stop", ""], capsys
    )
    assert code == 2 and err.strip().splitlines() == [
        'error: --stop "" would stop before the first token; give some text'
    ]


# ----------------------------------------------------------------------------- Ctrl-C, with a real SIGINT


class Running:
    """generate.py in a subprocess; its stdout and stderr are collected by threads as they arrive."""

    def __init__(self, argv, stdin=False):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "generate.py"), *map(str, argv)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.chunks = {"out": [], "err": []}
        self.readers = [
            threading.Thread(target=self._collect, args=(stream, self.chunks[key]), daemon=True)
            for key, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))
        ]
        for r in self.readers:
            r.start()

    @staticmethod
    def _collect(stream, chunks):
        for char in iter(lambda: stream.read(1), ""):
            chunks.append(char)

    @property
    def out(self):
        return "".join(self.chunks["out"])

    @property
    def err(self):
        return "".join(self.chunks["err"])

    def wait_for(self, condition, timeout=60):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"exited early ({self.proc.returncode}): {self.err}"
            assert time.monotonic() < deadline, f"timed out; stderr: {self.err}"
            time.sleep(0.02)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ctrl_c(self):
        self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout=60):
        code = self.proc.wait(timeout)
        for r in self.readers:
            r.join(timeout)
        return code, self.out, self.err


def greedy_text(checkpoint, prompts, max_new_tokens, max_seq_len=None):
    from checkpoint import load_model
    from generate import Generator, Sampling
    from tokenizer import load_tokenizer

    model, _ = load_model(checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(checkpoint)
    ids = [tok.encode(p) for p in prompts]
    gen = Generator(model)
    gen.setup(len(ids), max_seq_len or max(map(len, ids)) + max_new_tokens)
    return [tok.decode(t) for t in gen.generate(ids, max_new_tokens, Sampling(), tok.stop_ids).tokens]


def test_ctrl_c_during_start_up_is_quiet(long_checkpoint):
    run = Running(["--checkpoint", long_checkpoint, "--device", "cpu", "--prompt", "Hello"])
    time.sleep(0.5)  # importing torch
    run.ctrl_c()
    code, out, err = run.finish()
    assert (code, out, err) == (130, "", "interrupted\n")


def test_ctrl_c_while_streaming_ends_the_line_and_exits_130(long_checkpoint):
    run = Running(
        [
            "--checkpoint",
            long_checkpoint,
            "--device",
            "cpu",
            "--prompt",
            "Hello",
            "--temperature",
            0,
            "--max-new-tokens",
            3000,
        ]
    )
    run.wait_for(lambda: len(run.out) > 40)  # well into the 3000 tokens (seconds of work)
    run.ctrl_c()
    code, out, err = run.finish()
    assert code == 130
    assert out.startswith("Hello") and out.endswith("\n") and out.count("\n") == 1, out
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert "Sample 1/1" not in err  # it really stopped mid-generation


def test_ctrl_c_in_batch_mode_prints_each_row_so_far(long_checkpoint):
    prompts = ["Hello", "A longer second prompt"]
    run = Running(
        [
            "--checkpoint",
            long_checkpoint,
            "--device",
            "cpu",
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--temperature",
            0,
            "--max-new-tokens",
            3000,
        ]
    )
    run.wait_for(lambda: "Loaded" in run.err)
    time.sleep(2)  # a few hundred of the 3000 tokens
    run.ctrl_c()
    code, out, err = run.finish()
    assert code == 130 and err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert "Sample 1/1" not in err
    header0, header1 = f"--- [0] {prompts[0]!r}\n", f"--- [1] {prompts[1]!r}\n"
    assert out.startswith(header0) and header1 in out, out
    partial = out[len(header0) :].split(header1)
    partial = [partial[0].removesuffix("\n"), partial[1].removesuffix("\n")]
    reference = greedy_text(long_checkpoint, prompts, 100)
    for got, ref in zip(partial, reference):
        assert got and (ref.startswith(got) or got.startswith(ref)), (got[:80], ref[:80])


def test_ctrl_c_in_chat_stops_the_reply_and_keeps_the_conversation(long_checkpoint, tmp_path):
    """Ctrl-C stops a reply and the chat goes on from what is in the cache; Ctrl-C at the prompt leaves."""
    run = Running(
        [
            "--checkpoint",
            long_checkpoint,
            "--device",
            "cpu",
            "--chat",
            "--temperature",
            0,
            "--max-new-tokens",
            4000,
            "--json",
            tmp_path / "chat.json",
        ],
        stdin=True,
    )
    turns = ["Hi!", "Tell me more"]
    for i, user in enumerate(turns):
        shown = len(run.out)
        run.send(user)
        run.wait_for(lambda: len(run.out) > shown + 10)  # noqa: B023 - waited for here
        run.ctrl_c()
        run.wait_for(lambda: run.err.count("(reply stopped") == i + 1)  # noqa: B023 - waited for here
    time.sleep(0.3)  # back at the prompt
    run.ctrl_c()
    code, out, err = run.finish()
    assert code == 0 and "Traceback" not in err, err
    replies = json.loads((tmp_path / "chat.json").read_text())["turns"]
    assert [r["user"] for r in replies] == turns and all(r["interrupted"] for r in replies)
    assert "".join(r["reply"] + "\n" for r in replies) == out

    # each reply so far equals a fresh greedy run over the transcript the cache holds
    from checkpoint import load_model
    from generate import Generator, Sampling
    from tokenizer import load_tokenizer

    model, _ = load_model(long_checkpoint, "cpu", torch.float32)
    tok = load_tokenizer(long_checkpoint)
    gen = Generator(model)
    gen.setup(1, 4096)
    transcript = []
    for i, (user, reply) in enumerate(zip(turns, replies)):
        assert reply["reply_ids"], f"turn {i} stopped before its first token"
        transcript += tok.encode_chat_turn(user, first_turn=i == 0)
        res = gen.generate([transcript], len(reply["reply_ids"]), Sampling(), tok.stop_ids)
        assert res.tokens[0] == reply["reply_ids"], f"turn {i}"
        transcript += reply["reply_ids"] + tok.encode_reply("")  # a stopped reply is closed like a cut one


# ----------------------------------------------------------------------------- help and errors


def test_help_gives_every_flag_a_text_and_its_default(capsys):
    for action in generate.build_parser()._actions:
        if action.dest != "help":
            assert action.help and "(default: " in action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for expected in (
        "--temperature T sampling temperature; 0 = greedy (default: 0.8)",
        "--top-k K sample among the K most likely tokens; 0 = no top-k (default: 200)",
        "(default: 200) --stop",  # --max-new-tokens's, just before
        "--prompt-file PATH a UTF-8 text file whose whole text is one prompt; repeat for a batch",
    ):
        assert expected in text, expected


def test_argparse_type_error_is_the_short_usage_and_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--max-new-tokens", "abc"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: ") and lines[0].endswith("see --help"), lines
    assert lines[1].endswith("error: argument --max-new-tokens: invalid int value: 'abc'"), lines


def test_top_k_0_means_no_top_k(tiny_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", tiny_checkpoint, "--prompt", "Once", "--max-new-tokens", 10, "--device", "cpu"]
    assert run_main(common + ["--temperature", 0, "--top-k", 0], capsys)[0] == 0  # greedy: never an error
    for name, top_k in (("off", 0), ("vocab", 49152)):  # keeping the whole vocabulary is no top-k
        assert (
            run_main(common + ["--temperature", 1, "--seed", 3, "--top-k", top_k, "--json", tmp_path / name], capsys)[0]
            == 0
        )
    ids = [json.loads((tmp_path / name).read_text())["rows"][0]["token_ids"] for name in ("off", "vocab")]
    assert ids[0] == ids[1]
    code, _, err = run_main(common + ["--top-k", -1], capsys)
    assert code == 2 and "error: --top-k must be >= 0 (got -1); 0 means no top-k" in err


def test_prompt_file_problems_are_reported_before_the_model_loads(tiny_checkpoint, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n")
    for path, message in (
        (
            latin1,
            f"--prompt-file {latin1} is not UTF-8 text (byte 0xe9 at offset 3); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {latin1} > prompt.txt",
        ),
        (tmp_path, f"cannot read --prompt-file {tmp_path}: Is a directory"),
        (tmp_path / "missing.txt", "No such file or directory"),
        (blank, f"empty prompt: --prompt-file {blank} holds no text"),
    ):
        code, out, err = run_main(["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt-file", path], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
        assert "Loaded" not in err
    # a UTF-8 file with a byte-order mark: the mark is not part of the prompt
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffHello".encode("utf-8"))
    code, out, err = run_main(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--device",
            "cpu",
            "--prompt-file",
            bom,
            "--max-new-tokens",
            2,
            "--temperature",
            0,
        ],
        capsys,
    )
    assert code == 0 and out.startswith("Hello"), err


def test_checkpoint_that_is_a_file_says_so(tiny_checkpoint, tmp_path, capsys):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    for path, fix in (
        (tiny_checkpoint / "model.safetensors", f"pass its directory: --checkpoint {tiny_checkpoint}"),
        (gguf_file, f"convert it first: python scripts/convert_gguf.py --gguf {gguf_file}"),
        (other, "pass the directory that holds config.json and model.safetensors"),
    ):
        code, _, err = run_main(["--checkpoint", path, "--device", "cpu", "--prompt", "x"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"error: --checkpoint {path} is a file, not a checkpoint directory; {fix}" in err, err


def test_compile_on_the_cpu_warns_before_the_pause(tiny_checkpoint, capsys, monkeypatch):
    said_before_compiling = []

    def fake_compile(fn, **kwargs):  # what was on stderr when the (slow) first compiled call began
        def first_call(*args, **kw):
            said_before_compiling.append(capsys.readouterr().err)
            return fn(*args, **kw)

        return first_call

    monkeypatch.setattr(torch, "compile", fake_compile)
    code, _, err = run_main(
        [
            "--checkpoint",
            tiny_checkpoint,
            "--device",
            "cpu",
            "--compile",
            "--prompt",
            "x",
            "--max-new-tokens",
            3,
            "--temperature",
            0,
        ],
        capsys,
    )
    assert code == 0, err
    assert "the first run takes a while (minutes on 2 cores)" in said_before_compiling[0]


@pytest.mark.parametrize(
    "module",
    [
        "quantize",
        "scripts.convert_gguf",
        "scripts.convert_hf_checkpoint",
        "scripts.prepare_demo",
        "scripts.eval_quant",
        "scripts.download",
    ],
)
def test_every_script_gives_every_flag_a_help_text(module, capsys):
    import importlib
    import re

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    options = capsys.readouterr().out.split("options:\n")[1]
    for entry in re.split(r"\n(?=  -)", options.rstrip("\n")):
        lines = entry.splitlines()
        has_help = len(lines) > 1 or re.search(r"\S {2,}\S", lines[0].strip())
        assert has_help, f"{module}: {lines[0].strip()} has no help text"


def with_chat_template(checkpoint: Path, out: Path, template: str) -> Path:
    """A copy of checkpoint whose tokenizer_config.json carries this chat template."""
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
    return out


def record_prompts(monkeypatch) -> list:
    """The ids each Generator.generate call is given (in a chat: each turn's ids for the cache)."""
    sent = []
    real_generate = generate.Generator.generate

    def recording_generate(self, prompts, *args, **kwargs):
        sent.append(prompts[0])
        return real_generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(generate.Generator, "generate", recording_generate)
    return sent


# Numbers every message: a new turn's header depends on how long the conversation is, which a
# one-exchange stand-in transcript gets wrong from the third turn on.
NUMBERED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ loop.index }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {{ messages | length + 1 }}\n{% endif %}"
)


def test_chat_renders_each_turn_after_the_real_conversation(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The ids --chat appends for a turn are what transformers renders for the conversation so far
    (every earlier turn counted), past the previous reply's stop token."""
    import io

    from transformers.utils.chat_template_utils import render_jinja_template

    from tokenizer import load_tokenizer

    ckpt = with_chat_template(tiny_checkpoint, tmp_path / "numbered", NUMBERED_TEMPLATE)
    sent = record_prompts(monkeypatch)  # the ids each turn sent to the cache
    turns = ["Hi!", "What is 2+2?", "Thanks", "Bye"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    out_json = tmp_path / "chat.json"
    argv = ["--checkpoint", ckpt, "--device", "cpu", "--chat", "--temperature", "0", "--max-new-tokens", "4"]
    code, _, err = run_main(argv + ["--json", out_json], capsys)
    assert code == 0, err
    replies = json.loads(out_json.read_text())["turns"]
    assert len(sent) == len(replies) == len(turns)
    tok = load_tokenizer(ckpt)
    close = tok.encode_reply("")  # what closes a reply cut at --max-new-tokens

    def render(messages, add_generation_prompt):
        text = render_jinja_template(
            [messages], chat_template=NUMBERED_TEMPLATE, add_generation_prompt=add_generation_prompt
        )[0][0]
        return text

    messages = []
    for i, (user, reply) in enumerate(zip(turns, replies)):
        ids = sent[i]
        # what the cache holds before this turn: the conversation through the last reply's <|im_end|>
        held = render(messages, False).rpartition("<|im_end|>")
        held = held[0] + held[1]
        if i:
            assert not replies[i - 1]["stopped"]  # cut at 4 tokens: the turn begins by closing it
            assert ids[: len(close)] == close
            ids = ids[len(close) :]
        messages.append({"role": "user", "content": user})
        assert tok.decode(ids) == render(messages, True)[len(held) :], f"turn {i}"
        assert f"user {2 * i + 1}\n" in tok.decode(ids) and f"assistant {2 * i + 2}\n" in tok.decode(ids)
        messages.append({"role": "assistant", "content": reply["reply"]})


# Templates that rewrite an earlier turn when a message is added, so a chat cannot append turns:
# the system prompt goes into the last user message (as Mistral v0.3's does), or replies before the
# last question lose their reasoning and the reply after it opens with an empty think block (as
# Qwen3's does). Written for these tests, with ChatML's markers.
SYSTEM_IN_LAST_USER_TEMPLATE = (
    "{% for m in messages if m.role != 'system' %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'user' and loop.last and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINK_DROPPING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 > ns.last_user %}<think>\n\n</think>\n\n{{ m.content }}"
    "{% elif m.role == 'assistant' %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Every reply loses its reasoning, the last one too (as DeepSeek-R1's template does): prefix-stable, but
# the cache would hold reasoning the rendering drops.
THINK_DROPPING_EVERYWHERE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "template, flags",
    [
        (SYSTEM_IN_LAST_USER_TEMPLATE, []),
        (THINK_DROPPING_TEMPLATE, []),
        (THINK_DROPPING_EVERYWHERE_TEMPLATE, []),
        (SYSTEM_IN_LAST_USER_TEMPLATE, ["--prompt-lookup", "2", "--speculate-k", "3"]),
        (SYSTEM_IN_LAST_USER_TEMPLATE, ["--draft-checkpoint", "DRAFT", "--speculate-k", "3"]),
    ],
    ids=["system", "think", "think-everywhere", "system-lookup", "system-draft"],
)
def test_chat_with_a_template_that_rewrites_earlier_turns(
    template, flags, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    """--chat re-renders such a conversation whole each turn, as transformers does: the cache keeps
    the prefix it shares with the new rendering and prefills the rest, and every reply equals a
    fresh greedy run over transformers' rendering of the conversation so far (speculative steps
    too: the lookup history and the draft's cache are rewritten from the kept prefix on)."""
    import io

    from transformers.utils.chat_template_utils import render_jinja_template

    from generate import Generator, Sampling
    from tokenizer import load_tokenizer

    ckpt = with_chat_template(tiny_checkpoint, tmp_path / "rewriting", template)
    tok = load_tokenizer(ckpt)
    assert not tok.appends_turns("Be brief.") and load_tokenizer(tiny_checkpoint).appends_turns("Be brief.")
    sent = record_prompts(monkeypatch)  # the ids each turn sent to the cache
    turns = ["Hi!", "What is 2+2?", "/reset", "Again", "Thanks"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    out_json = tmp_path / "chat.json"
    argv = ["--checkpoint", ckpt, "--device", "cpu", "--chat", "--temperature", "0", "--max-new-tokens", "5"]
    flags = [str(tiny_checkpoint) if f == "DRAFT" else f for f in flags]  # the model drafts for itself
    code, _, err = run_main(argv + flags + ["--system", "Be brief.", "--json", out_json], capsys)
    assert code == 0, err
    monkeypatch.undo()  # the fresh runs below are not recorded
    replies = json.loads(out_json.read_text())["turns"]
    assert replies[2] == {"reset": True}
    from checkpoint import load_model

    model, _ = load_model(ckpt, "cpu", torch.float32)
    fresh = Generator(model)
    fresh.setup(1, 256)
    messages, held = [{"role": "system", "content": "Be brief."}], []
    for i, (user, reply) in enumerate((u, r) for u, r in zip(turns, replies) if u != "/reset"):
        if user == "Again":  # after /reset the cache starts over
            messages, held = messages[:1], []
        messages.append({"role": "user", "content": user})
        text = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)[0][0]
        keep = reply["cache_slots_reused"]
        assert tok.decode(held[:keep] + sent[i]) == text, f"turn {i}"  # what the cache holds = the rendering
        if held:  # some of the cache is kept; the system template rewrote an earlier user turn
            rewrites_user_turns = template is SYSTEM_IN_LAST_USER_TEMPLATE
            assert 0 < keep <= len(held) and (keep < len(held) or not rewrites_user_turns), f"turn {i}"
        ids = tok.encode_special(text)
        assert held[:keep] + sent[i] == ids
        fresh.reset()
        assert fresh.generate([ids], 5, Sampling(), tok.stop_ids).tokens[0] == reply["reply_ids"], f"turn {i}"
        held = ids + reply["reply_ids"]  # cut at 5 tokens: no stop id
        assert not reply["stopped"] and reply["cache_slots_used"] == len(held) - 1  # the last id is pending
        assert (reply["speculation"] is not None) == bool(flags)
        messages.append({"role": "assistant", "content": reply["reply"]})


def test_rewind_keeps_a_prefix_of_the_held_sequence(tiny_checkpoint):
    """Generator.rewind: a continued call after it equals a fresh run over the kept ids + the new ones."""
    from checkpoint import load_model
    from generate import Generator, Sampling, UsageError

    model, _ = load_model(tiny_checkpoint, "cpu", torch.float32)
    gen = Generator(model)
    gen.setup(1, 256)
    first = list(range(100, 120))
    res = gen.generate([first], 6, Sampling(), continue_sequence=True)
    assert gen.position + len(gen.pending) == 20 + 6
    with pytest.raises(UsageError):
        gen.rewind(27)
    gen.rewind(12)
    assert (gen.position, gen.pending) == (12, [])
    again = gen.generate([list(range(300, 305))], 6, Sampling(), continue_sequence=True)
    gen.reset()
    want = gen.generate([first[:12] + list(range(300, 305))], 6, Sampling())
    assert again.tokens == want.tokens and res.tokens[0]
    gen.rewind(gen.position + len(gen.pending))  # keeping it all changes nothing
    gen.generate([[7, 8]], 2, Sampling())  # a new batch: nothing held to rewind
    gen.position = None
    with pytest.raises(UsageError):
        gen.rewind(0)


# Qwen3's switch, written for this test: with enable_thinking false the generation prompt opens an
# empty think block, so the model answers at once.
THINKING_SWITCH_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_chat_template_kwargs_reach_the_template(tiny_checkpoint, tmp_path, capsys):
    """--chat-template-kwargs: the prompt is what transformers renders with the same variables."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tokenizer import load_tokenizer

    ckpt = with_chat_template(tiny_checkpoint, tmp_path / "switch", THINKING_SWITCH_TEMPLATE)
    tok = load_tokenizer(ckpt)
    messages = [{"role": "user", "content": "Hi"}]
    argv = ["--checkpoint", ckpt, "--device", "cpu", "--chat-template", "--prompt", "Hi", "--max-new-tokens", "2"]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        out_json = tmp_path / "r.json"
        flags = ["--chat-template-kwargs", json.dumps(kwargs)] if kwargs else []
        code, _, err = run_main(argv + flags + ["--json", out_json], capsys)
        assert code == 0, err
        text = render_jinja_template([messages], chat_template=THINKING_SWITCH_TEMPLATE, add_generation_prompt=True,
                                     **kwargs)[0][0]  # fmt: skip
        assert ("<think>" in text) == (kwargs == {"enable_thinking": False})
        assert json.loads(out_json.read_text())["rows"][0]["prompt_ids"] == tok.encode_special(text)


@pytest.mark.parametrize(
    "value, words",
    [
        ("{enable_thinking: false}", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"messages": []}', "cannot set messages"),
        ('{"enable_thinking": false}', "add --chat or --chat-template"),
    ],
)
def test_bad_chat_template_kwargs_are_one_line_errors(tiny_checkpoint, value, words, capsys):
    argv = ["--checkpoint", tiny_checkpoint, "--device", "cpu", "--prompt", "Hi", "--chat-template-kwargs", value]
    if words != "add --chat or --chat-template":
        argv.append("--chat-template")
    code, _, err = run_main(argv, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_chat_template_kwargs_without_a_template_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint whose chat format is built in (no template) has no variables to set."""
    ckpt = tmp_path / "no-template"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    argv = ["--checkpoint", ckpt, "--device", "cpu", "--prompt", "Hi", "--chat-template"]
    code, _, err = run_main(argv + ["--chat-template-kwargs", '{"enable_thinking": false}'], capsys)
    assert code == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1, err
