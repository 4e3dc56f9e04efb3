"""scripts/eval.py: lm-evaluation-harness on our engine, against lm-eval's own Hugging Face backend.

Three small local tasks in lm-eval's YAML format over JSON files (no hub): multiple choice,
generation with stop strings, and rolling perplexity over Botchan. Our LM must give the
log-likelihoods and choices of lm-eval's `hf` backend (transformers running the same weights)
on a tiny random Llama and on the real SmolLM2; generate_until must give generate.py's greedy
text; the rolling perplexity must equal scripts/perplexity.py's.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import generate  # noqa: E402
from scripts import eval as fastgen_eval  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

MC_DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "answer": 1},
    {"question": "What color is the sky on a clear day?", "choices": ["green", "red", "blue", "yellow"], "answer": 2},
    {"question": "Which animal barks?", "choices": ["cat", "cow", "fish", "dog"], "answer": 3},
]
GEN_DOCS = [
    {"question": "The capital of France is", "answer": "Paris"},
    {"question": "Two plus two equals", "answer": "four"},
    {
        "question": "The largest planet in our solar system, named after the king of the Roman gods, is",
        "answer": "Jupiter",
    },
]
TASKS = {
    "local_mc": """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    "local_gen": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: " {{answer}}"
generation_kwargs: {until: [".", "\\n"], max_gen_toks: 12, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}
""",
    "local_botchan": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
  - {metric: bits_per_byte}
""",
}


def botchan_passages():
    from scripts.assets import botchan_path

    lines = [line for line in botchan_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    return [" ".join(lines[:12]), " ".join(lines[40:46])]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    docs = {"local_mc": MC_DOCS, "local_gen": GEN_DOCS, "local_botchan": [{"text": t} for t in botchan_passages()]}
    for name, body in TASKS.items():
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs[name]))
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n"
            f"  data_files:\n    test: {data}\ntest_split: test\n{body}"
        )
    return d


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def evaluate(lm, tasks, task_manager, limit=None):
    """simple_evaluate with per-document outputs; returns (results, {task: [response per doc]})."""
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, log_samples=True, bootstrap_iters=0, limit=limit
    )
    responses = {
        task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in out["samples"].items()
    }
    return out["results"], responses


def hf_tokenizer(checkpoint):
    """transformers' own fast tokenizer over the checkpoint's tokenizer.json and its special tokens."""
    from tokenizer import load_tokenizer

    ours = load_tokenizer(checkpoint)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"),
        bos_token=ours.backend.id_to_token(ours.bos_id) if ours.bos_id is not None else None,
        eos_token=ours.backend.id_to_token(ours.eos_id),
    )


def assert_same_scores(ours, theirs, rel=1e-5, abs_=1e-4):
    assert ours.keys() == theirs.keys()
    for task in ours:
        for doc, (a, b) in enumerate(zip(ours[task], theirs[task], strict=True)):
            for x, y in zip(a, b, strict=True):  # one response per choice / per document
                x, y = x[0], y[0]
                if isinstance(x, tuple):  # (log-likelihood, is_greedy)
                    assert x[1] == y[1], (task, doc)
                    x, y = x[0], y[0]
                assert x == pytest.approx(y, rel=rel, abs=abs_), (task, doc)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama in Hugging Face format with SmolLM2's real tokenizer, and our conversion of it."""
    import gguf

    from scripts.assets import smollm2_gguf_path
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from tokenizer import gguf_tokenizer_files

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf_dir = tmp_path_factory.mktemp("tiny_hf") / "hf"
    hf.save_pretrained(hf_dir)
    for name, text in gguf_tokenizer_files(gguf.GGUFReader(str(smollm2_gguf_path()))).items():
        (hf_dir / name).write_text(text)
    ours = convert_hf_checkpoint(hf_dir, hf_dir.parent / "ours")
    return hf, ours


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_checkpoint, tmp_path_factory):
    """transformers' LlamaForCausalLM loading the same GGUF (its own dequantizer and layout)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from scripts.assets import smollm2_gguf_path

    gguf_path = smollm2_gguf_path()
    d = tmp_path_factory.mktemp("smollm2_gguf")
    (d / gguf_path.name).symlink_to(gguf_path)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def ours_and_hf(checkpoint, hf_model, max_length, batch_size=3, **kwargs):
    ours = fastgen_eval.FastgenLM(
        checkpoint, "cpu", torch.float32, batch_size=batch_size, max_length=max_length, **kwargs
    )
    theirs = HFLM(
        pretrained=hf_model,
        tokenizer=hf_tokenizer(checkpoint),
        batch_size=batch_size,
        max_length=max_length,
        device="cpu",
        prefix_token_id=ours.prefix_token_id,
    )
    return ours, theirs


# ----------------------------------------------------------------------------- parity with lm-eval's hf backend


def test_tiny_llama_matches_hf_backend(tiny, task_manager):
    hf_model, checkpoint = tiny
    # 64-token windows: the Botchan passages span several, mixed across documents in one batch
    ours, theirs = ours_and_hf(checkpoint, hf_model, max_length=64)
    tasks = ["local_mc", "local_botchan"]
    our_results, our_scores = evaluate(ours, tasks, task_manager)
    hf_results, hf_scores = evaluate(theirs, tasks, task_manager)
    assert_same_scores(our_scores, hf_scores)
    assert our_results["local_mc"]["acc,none"] == hf_results["local_mc"]["acc,none"]
    # the same weights with batch size 1 and a 4x larger cache give the same numbers
    ours.batch_size = 1
    assert_same_scores(evaluate(ours, tasks, task_manager)[1], our_scores)


def test_smollm2_matches_hf_backend(smollm2_checkpoint, smollm2_hf, task_manager):
    # two documents of each task (2 CPU cores); 48-token windows, so the rolling passage takes several
    ours, theirs = ours_and_hf(smollm2_checkpoint, smollm2_hf, max_length=48)
    tasks = ["local_mc", "local_botchan"]
    our_results, our_scores = evaluate(ours, tasks, task_manager, limit=2)
    hf_results, hf_scores = evaluate(theirs, tasks, task_manager, limit=2)
    assert_same_scores(our_scores, hf_scores, rel=1e-4, abs_=1e-3)  # sums of up to 150 tokens' fp32 logprobs
    assert our_results["local_mc"]["acc,none"] == hf_results["local_mc"]["acc,none"]
    paris = [choice[0][0] for choice in our_scores["local_mc"][0]]
    assert max(paris) == paris[0]  # a real model: "Paris" is the likeliest answer


# ----------------------------------------------------------------------------- generation and perplexity


def test_generate_until_equals_generate_cli(smollm2_checkpoint, tmp_path, capsys):
    """Different-length prompts in one batch, each with its own stop strings and token budget."""
    requests = [
        ("The capital of France is", {"until": ["."], "max_gen_toks": 8}),
        ("Count with me: one, two, three,", {"until": [" six", "\n"], "max_gen_toks": 10}),
        ("Write a haiku about the sea:\n", {"until": ["\n\n"], "max_gen_toks": 5}),
    ]
    lm = fastgen_eval.FastgenLM(smollm2_checkpoint, "cpu", torch.float32, batch_size=3)
    texts = lm.generate_until([Instance("generate_until", {}, req, i) for i, req in enumerate(requests)])
    fired = 0
    for (context, kwargs), text in zip(requests, texts):
        out = tmp_path / "g.json"
        argv = [
            "--checkpoint",
            smollm2_checkpoint,
            "--prompt",
            context,
            "--max-new-tokens",
            kwargs["max_gen_toks"],
            "--temperature",
            0,
            "--device",
            "cpu",
            "--json",
            out,
        ]
        for stop in kwargs["until"]:
            argv += ["--stop", stop]
        assert generate.main([str(a) for a in argv]) == 0
        row = json.loads(out.read_text())["rows"][0]
        assert text == row["completion"], context
        assert not any(stop in text for stop in kwargs["until"])
        fired += row["stop_string"] is not None
    capsys.readouterr()
    assert texts[0].strip().startswith("Paris") and fired >= 2  # real stops fired, not just budgets


def test_rolling_perplexity_equals_perplexity_script(smollm2_checkpoint, task_manager):
    """One window holding the whole passage: scripts/perplexity.py scores the same tokens after the
    same prefix token, so the per-token perplexities must agree."""
    from scripts.perplexity import evaluate as perplexity

    lm = fastgen_eval.FastgenLM(smollm2_checkpoint, "cpu", torch.float32, batch_size=2, max_length=2048)
    results, scores = evaluate(lm, ["local_botchan"], task_manager)
    for text, (response,) in zip(botchan_passages(), scores["local_botchan"], strict=True):
        ids = lm.tok_encode(text)
        reference = perplexity(smollm2_checkpoint, [lm.prefix_token_id] + ids, window=len(ids) + 1)
        assert reference["tokens"] == len(ids)
        assert math.exp(-response[0] / len(ids)) == pytest.approx(reference["perplexity"], rel=1e-5)
    # the harness turns the same log-likelihoods into its word perplexity
    words = sum(len(t.split()) for t in botchan_passages())
    total = sum(r[0][0] for r in scores["local_botchan"])
    assert results["local_botchan"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-6)


def test_quantized_weights_kv_cache_and_compile(tiny, task_manager, tmp_path):
    """int8 weights and an int8 KV cache stay close to fp32; a compiled decode step gives eager's text."""
    from quantize import quantize_checkpoint

    _, checkpoint = tiny
    tasks = ["local_mc", "local_botchan"]
    fp32 = fastgen_eval.FastgenLM(checkpoint, "cpu", torch.float32, batch_size=4, max_length=64)
    _, reference = evaluate(fp32, tasks, task_manager)
    int8 = quantize_checkpoint(checkpoint, "int8", output_dir=tmp_path / "int8")
    quantized = fastgen_eval.FastgenLM(
        int8, "cpu", torch.float32, kv_cache_dtype=torch.int8, batch_size=4, max_length=64
    )
    assert_same_scores(evaluate(quantized, tasks, task_manager)[1], reference, rel=0.02, abs_=0.05)

    compiled = fastgen_eval.FastgenLM(checkpoint, "cpu", torch.float32, compile=True, batch_size=2, max_length=64)
    requests = [
        Instance("generate_until", {}, (doc["question"], {"until": ["."], "max_gen_toks": 6}), i)
        for i, doc in enumerate(GEN_DOCS)
    ]
    assert compiled.generate_until(requests) == fp32.generate_until(requests)


# ----------------------------------------------------------------------------- the CLI


def run_cli(*args, env=None):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_runs_every_request_type_and_writes_results_json(tiny, tasks_dir, tmp_path):
    _, checkpoint = tiny
    out = tmp_path / "results" / "out.json"
    code, stdout, stderr = run_cli(
        "--checkpoint",
        checkpoint,
        "--tasks",
        "local_mc,local_gen,local_botchan",
        "--include-path",
        tasks_dir,
        "--batch-size",
        2,
        "--max-length",
        64,
        "--kv-cache-dtype",
        "int8",
        "--output",
        out,
    )
    assert code == 0, stderr
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"local_mc", "local_gen", "local_botchan"}
    assert results["n-samples"]["local_gen"]["effective"] == len(GEN_DOCS)
    assert 0 <= results["results"]["local_mc"]["acc,none"] <= 1
    assert results["results"]["local_botchan"]["word_perplexity,none"] > 1
    assert results["config"]["model"] == "fastgen" and results["config"]["batch_size"] == 2
    assert "local_botchan" in stdout and "fastgen loglikelihood" in stderr  # table and progress bars
    assert [p.name for p in out.parent.iterdir()] == ["out.json"]  # written atomically, no temp left


def one_line_error(code, stderr, *must_contain):
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for text in must_contain:
        assert text in errors[0], stderr


def test_cli_unknown_task_and_bad_options(tiny, tasks_dir, capsys):
    _, checkpoint = tiny
    code = fastgen_eval.main(
        ["--checkpoint", str(checkpoint), "--tasks", "local_mc,no_such_task", "--include-path", str(tasks_dir)]
    )
    one_line_error(code, capsys.readouterr().err, "unknown task 'no_such_task'")
    code = fastgen_eval.main(["--checkpoint", str(checkpoint), "--tasks", "local_mc", "--batch-size", "0"])
    one_line_error(code, capsys.readouterr().err, "--batch-size must be at least 1")


def test_cli_task_that_needs_the_hub_while_offline(tiny, tmp_path):
    _, checkpoint = tiny
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices.text}}'\n"
        "doc_to_target: 0\n"
    )
    code, _, stderr = run_cli("--checkpoint", checkpoint, "--tasks", "hub_task", "--include-path", tmp_path)
    one_line_error(code, stderr, "'hub_task' needs its dataset from the Hugging Face hub", "offline")


def test_repo_local_tasks_load_without_the_hub():
    """eval_tasks/ (the tasks of BENCHMARKS.md) builds its datasets from files here."""
    manager = TaskManager(include_path=str(REPO / "eval_tasks"), include_defaults=False)
    tasks = manager.load(["fastgen_local"])["tasks"]
    sizes = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert sizes == {"fastgen_facts": 40, "fastgen_arith": 50, "fastgen_botchan": 20}
