"""Tensor parallelism (tp.py): torchrun with 2 ranks gives exactly the greedy tokens of one process.

The CPU tests launch `python -m torch.distributed.run --standalone --nproc-per-node 2` (gloo) as a
subprocess twice: once on generate.py itself, once on this file as a worker that runs generate.main
for several cases inside one process group (int8, int4, int8 KV cache, a GQA model with 4 kv
heads, qkv bias and an untied output, sampling with a seed, --chat). The reference is the same
CLI in this process. Tiny fp32 models; one has n_kv_heads == 2, so each rank holds one kv head.

The `gpu` tests need 2 CUDA devices (NCCL): eager CUDA graphs and --compile against one GPU.
"""

import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":  # the torchrun worker: runs before pytest's conftest could set the path
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402

import generate  # noqa: E402
import tp  # noqa: E402
from checkpoint import load_model, save_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

TORCHRUN_TIMEOUT_S = 240
COMMON = ["--device", "cpu", "--max-new-tokens", "8", "--temperature", "0"]
PROMPTS = ["--prompt", "Hello there", "--prompt", "The quick brown fox jumps over the lazy dog, and then"]

# n_kv_heads == 2: one kv head per rank; tied embeddings
KV2 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, tie_embeddings=True)
# 2 kv heads per rank, head_dim 8, Qwen-style qkv bias and q/k norm, an untied output projection
KV4 = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, intermediate_size=96, qkv_bias=True, qk_norm=True)


def make_checkpoint(out: Path, tokenizer_files: dict, seed: int, **kwargs) -> Path:
    """A tiny random model with the given tokenizer files."""
    torch.manual_seed(seed)
    args = ModelArgs(**{"vocab_size": 49152, "max_position_embeddings": 256, **kwargs})
    model = Transformer(args)
    for name, p in model.named_parameters():  # non-trivial norms and biases, so slicing errors show
        if p.dim() == 1:
            p.data.normal_(1.0 if "norm" in name else 0.0, 0.2)
    # A small embedding (nn.Embedding's N(0, 1) would make a tied output repeat the input token
    # whatever the layers do): the layers, and so the sharding, decide the tokens.
    model.tok_embeddings.weight.data.normal_(0.0, 0.05)
    save_checkpoint(out, {"model_args": asdict(args), "quantization": None}, model.state_dict(), tokenizer_files)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import gguf

    from quantize import quantize_checkpoint
    from scripts.assets import smollm2_gguf_path
    from tokenizer import gguf_tokenizer_files

    root = tmp_path_factory.mktemp("tp")
    files = gguf_tokenizer_files(gguf.GGUFReader(str(smollm2_gguf_path())))  # the real SmolLM2 tokenizer
    kv2 = make_checkpoint(root / "kv2", files, 0, **KV2)
    return {
        "kv2": kv2,
        "kv4": make_checkpoint(root / "kv4", files, 1, **KV4),
        "int8": quantize_checkpoint(kv2, "int8", output_dir=root / "kv2-int8"),
        "int4": quantize_checkpoint(kv2, "int4", groupsize=32, output_dir=root / "kv2-int4"),
    }


def torchrun(args: list, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        cmd, cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S
    )


def one_process(argv: list, stdin: str | None = None, monkeypatch=None) -> int:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return generate.main([str(a) for a in argv])


def tokens(path: Path) -> list:
    data = json.loads(path.read_text())
    if "turns" in data:
        return [t["reply_ids"] for t in data["turns"]]
    return [row["token_ids"] for row in data["rows"]]


# ----------------------------------------------------------------------------- CPU, gloo


def test_torchrun_generate_py_gives_the_tokens_of_one_process(checkpoints, tmp_path, capsys):
    """A batch of two different-length prompts; n_kv_heads 2 (one per rank)."""
    argv = ["--checkpoint", checkpoints["kv2"], *PROMPTS, *COMMON]
    proc = torchrun(["generate.py", *argv, "--json", tmp_path / "tp.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one_process([*argv, "--json", tmp_path / "one.json"]) == 0
    assert tokens(tmp_path / "tp.json") == tokens(tmp_path / "one.json")
    assert all(len(row) == 8 for row in tokens(tmp_path / "one.json"))  # the tiny model never stops early
    assert all(len(set(row)) > 1 for row in tokens(tmp_path / "one.json"))  # the layers decide, not the input
    # rank 0 alone prints: each completion once
    assert proc.stdout.count("--- [0]") == 1 and proc.stdout.count("--- [1]") == 1
    assert proc.stderr.count("Loaded ") == 1
    assert "peak host memory per rank" in proc.stderr
    tp_json, one_json = (json.loads((tmp_path / f).read_text()) for f in ("tp.json", "one.json"))
    assert tp_json["world_size"] == 2 and one_json["world_size"] == 1
    assert len(tp_json["peak_host_memory_bytes_per_rank"]) == 2
    # each rank holds half of every layer weight and the whole (tied) embedding
    args = ModelArgs(**KV2)
    per_layer = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + args.n_heads * args.head_dim  # wqkv, wo
    per_layer += 3 * args.intermediate_size  # w13, w2
    layer_bytes = 4 * args.n_layers * args.dim * per_layer
    assert one_json["model_bytes"] - tp_json["model_bytes"] == layer_bytes // 2


def test_torchrun_worker_cases_give_the_tokens_of_one_process(checkpoints, tmp_path, monkeypatch, capsys):
    """int8 and int4 weights, the int8 KV cache, a 4-kv-head model with qkv bias and an untied
    output, seeded sampling and --chat, in one torchrun launch (one process group)."""
    cases = {  # one launch for all: each case costs a model load per rank, not a process group
        "kv4_kv_int8": (["--checkpoint", checkpoints["kv4"], *PROMPTS, *COMMON, "--kv-cache-dtype", "int8"], None),
        "int8": (["--checkpoint", checkpoints["int8"], *PROMPTS, *COMMON], None),
        "int4": (["--checkpoint", checkpoints["int4"], "--prompt", "Hello there", *COMMON], None),
        "chat_sampled": (
            ["--checkpoint", checkpoints["kv2"], "--chat", *COMMON, "--temperature", "0.8", "--seed", "3"],
            "Hi!\nTell me more.\n/exit\n",
        ),
    }
    worker_cases = [
        {"argv": [str(a) for a in argv] + ["--json", str(tmp_path / f"tp-{name}.json")], "stdin": stdin}
        for name, (argv, stdin) in cases.items()
    ]
    (tmp_path / "cases.json").write_text(json.dumps(worker_cases))
    proc = torchrun([Path(__file__).relative_to(REPO), tmp_path / "cases.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (argv, stdin) in cases.items():
        assert one_process([*argv, "--json", tmp_path / f"one-{name}.json"], stdin, monkeypatch) == 0, name
        assert tokens(tmp_path / f"tp-{name}.json") == tokens(tmp_path / f"one-{name}.json"), name
    assert len(tokens(tmp_path / "tp-chat_sampled.json")) == 2


def worker(cases_path: str) -> int:
    """Under torchrun: run generate.main for each case of the JSON list, in one process group."""
    for case in json.loads(Path(cases_path).read_text()):
        if case["stdin"] is not None:
            sys.stdin = io.StringIO(case["stdin"])
        code = generate.main(case["argv"])
        if code:
            return code
    return 0


# ----------------------------------------------------------------------------- in-process units


def test_each_rank_reads_its_slice_and_the_slices_make_the_whole(checkpoints):
    """Rank 0's and rank 1's tensors, put back together along their split parts, are the file's."""
    from safetensors import safe_open

    for key in ("kv4", "int8", "int4"):
        path = checkpoints[key] / "model.safetensors"
        full_args = ModelArgs(**json.loads((checkpoints[key] / "config.json").read_text())["model_args"])
        shards = [tp.Shard(r, 2) for r in range(2)]
        for s in shards:
            s.local_args(full_args, {"mode": "int4", "groupsize": 32} if key == "int4" else None)
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                whole = f.get_tensor(name)
                split = shards[0].split(name)
                got = [s.read(name, f.get_slice(name)) for s in shards]
                if split is None:
                    assert all(torch.equal(g, whole) for g in got), name
                    continue
                axis, parts = split
                unit = whole.shape[axis] // sum(parts)
                pieces = [g.split([p * unit // 2 for p in parts], dim=axis) for g in got]
                rebuilt = torch.cat([pieces[r][i] for i in range(len(parts)) for r in range(2)], dim=axis)
                assert torch.equal(rebuilt, whole), name


def test_a_shard_holds_its_heads_and_its_kv_cache_only(checkpoints):
    """load_model with a Shard builds the rank's slice: half the heads, half the MLP, and a KV
    cache of its own kv heads (no process group needed to build it)."""
    model, _ = load_model(checkpoints["kv2"], "cpu", torch.float32, shard=tp.Shard(1, 2))
    assert (model.args.n_heads, model.args.n_kv_heads, model.args.head_dim) == (2, 1, 16)
    assert model.layers[0].attention.wqkv.weight.shape == ((2 + 2 * 1) * 16, 64)
    assert model.layers[0].feed_forward.w2.weight.shape == (64, 64)
    model.setup_caches(1, 32)
    assert model.layers[0].attention.kv_cache.k_cache.shape == (1, 1, 128, 16)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(dim=48, n_heads=6, n_kv_heads=3, intermediate_size=128), "n_kv_heads=3 not divisible by 2"),
        (dict(dim=48, n_heads=3, n_kv_heads=1, intermediate_size=128), "n_heads=3, n_kv_heads=1 not divisible by 2"),
        (dict(dim=64, n_heads=4, n_kv_heads=2, intermediate_size=101), "intermediate_size=101 not divisible by 2"),
    ],
)
def test_sizes_that_do_not_divide_are_a_one_line_error(sizes, message):
    with pytest.raises(tp.TensorParallelError, match=message) as e:
        tp.Shard(0, 2).local_args(ModelArgs(n_layers=1, **sizes))
    assert "\n" not in str(e.value)


def test_int4_group_size_must_divide_each_ranks_in_features():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=128)
    with pytest.raises(tp.TensorParallelError, match="int4 group size 64 does not divide wo's 32 input features"):
        tp.Shard(0, 2).local_args(args, {"mode": "int4", "groupsize": 64})


def test_more_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(tp.TensorParallelError, match="4 ranks per node but this node has 2 GPU"):
        tp.local_device(torch.device("cuda"))


@pytest.mark.parametrize(
    "flags", [["--prompt-lookup", "3"], ["--draft-checkpoint", "d"], ["--package", "p.pt2"], ["--compile-blocks"]]
)
def test_one_process_features_under_torchrun_are_a_one_line_error(monkeypatch, flags):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = generate.parse_args(["--checkpoint", "c", "--prompt", "hi", *flags])
    with pytest.raises(generate.UsageError, match=f"{flags[0]} run in one process; drop them under torchrun"):
        generate.validate(args)


# ----------------------------------------------------------------------------- GPU, NCCL

GPU_TIMEOUT_S = 480  # two ranks compiling at once


def two_gpus():
    return pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture(scope="module")
def gpu_checkpoints(tmp_path_factory):
    """The GPU machine has no tokenizer assets: test_gpu's SentencePiece model trained on the spot."""
    from test_gpu import tiny_sentencepiece_model

    from quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("tp-gpu")
    files = {"tokenizer.model": tiny_sentencepiece_model()}
    kv2 = make_checkpoint(root / "kv2", files, 0, **dict(KV2, vocab_size=300))
    return {"kv2": kv2, "int8": quantize_checkpoint(kv2, "int8", output_dir=root / "kv2-int8")}


def gpu_run(cmd: list) -> subprocess.CompletedProcess:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")  # no NVLink multicast on these machines
    return subprocess.run(
        [str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=GPU_TIMEOUT_S
    )


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
GPU_PROMPTS = ["--prompt", "the fox", "--prompt", "seven wizards quietly hum old tunes over a lazy dog"]


@pytest.mark.gpu
@two_gpus()
@pytest.mark.parametrize("compile", [False, True], ids=["cuda-graph", "compile"])
def test_gpu_torchrun_gives_the_tokens_of_one_gpu(gpu_checkpoints, tmp_path, compile):
    """NCCL, fp32 (exact greedy tokens): eager decode as a recorded CUDA graph, and --compile
    (one CUDA graph per rank, the all-reduces inside it), against one GPU."""
    argv = ["generate.py", "--checkpoint", gpu_checkpoints["kv2"], *GPU_PROMPTS, "--device", "cuda"]
    argv += ["--dtype", "fp32", "--max-new-tokens", "16", "--temperature", "0"] + (["--compile"] if compile else [])
    proc = gpu_run([*TORCHRUN_2, *argv, "--json", tmp_path / "tp.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = gpu_run([sys.executable, *argv, "--json", tmp_path / "one.json"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert tokens(tmp_path / "tp.json") == tokens(tmp_path / "one.json")
    assert json.loads((tmp_path / "tp.json").read_text())["world_size"] == 2


@pytest.mark.gpu
@two_gpus()
def test_gpu_torchrun_int8_bf16_and_int8_kv_cache(gpu_checkpoints, tmp_path):
    """int8 weights in bf16 with an int8 KV cache, compiled, on 2 GPUs: runs and the ranks agree
    (tp.report_ranks compares their tokens; bf16 split sums may differ from one GPU's)."""
    argv = ["generate.py", "--checkpoint", gpu_checkpoints["int8"], *GPU_PROMPTS, "--device", "cuda"]
    argv += ["--dtype", "bf16", "--max-new-tokens", "16", "--temperature", "0", "--kv-cache-dtype", "int8"]
    proc = gpu_run([*TORCHRUN_2, *argv, "--compile", "--json", tmp_path / "tp.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "tp.json").read_text())
    assert data["world_size"] == 2 and len(data["peak_host_memory_bytes_per_rank"]) == 2
    assert all(len(r["token_ids"]) == 16 or r["stopped"] for r in data["rows"])


@pytest.mark.gpu
@two_gpus()
def test_gpu_more_ranks_than_gpus_is_a_one_line_error(gpu_checkpoints):
    n = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n, "generate.py"]
    proc = gpu_run([*cmd, "--checkpoint", gpu_checkpoints["kv2"], "--device", "cuda", "--max-new-tokens", 2])
    assert proc.returncode != 0
    assert f"error: {n} ranks per node but this node has {n - 1} GPU(s)" in proc.stderr


@pytest.mark.gpu
@two_gpus()
@pytest.mark.parametrize("all_reduce", ["nccl", "symm-mem"])
def test_gpu_bench_tp_worker_runs(tmp_path, all_reduce):
    """scripts/bench_tp.py (what bench.py --tp launches) on a small real shape, both all-reduces."""
    cmd = [*TORCHRUN_2, "scripts/bench_tp.py", "--model", "qwen2.5-0.5b", "--new-tokens", "16", "--runs", "1"]
    proc = gpu_run([*cmd, "--all-reduce", all_reduce, "--json", tmp_path / "r.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["world_size"] == 2 and row["decode_tok_s"] > 0
    assert isinstance(row["standalone_all_reduce_ms_per_step"], float), row["standalone_all_reduce_ms_per_step"]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
