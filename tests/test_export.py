"""scripts/export.py and generate.py --package: an AOTInductor package of the prefill and decode
steps gives the greedy tokens of the eager model and of --compile, keeps every cache write, and
refuses in one line a package made for something else or a request beyond its shapes.

One tiny package (batch 2, 64 slots, prefill up to 16 tokens) is exported and compiled once per
module on the CPU (about a minute on 2 cores); the GPU test exports its own on CUDA.
"""

import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_cli import make_tiny_checkpoint, run_main

import generate
from checkpoint import load_model, save_checkpoint
from model import KVCache, ModelArgs, Transformer
from package import Package, PackageError, check_package, read_metadata
from scripts.export import export_package, export_steps

BATCH, SLOTS, PREFILL = 2, 64, 16
LONG = "The quick brown fox jumps over the lazy dog and then it runs far away into the forest where nobody finds it"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_tiny_checkpoint(root / "tiny", max_position_embeddings=256)
    pkg = root / "tiny.pt2"
    export_package(ckpt, pkg, BATCH, SLOTS, torch.float32, "cpu", PREFILL, log=lambda s: None)
    return ckpt, pkg


def token_ids(argv, capsys, json_path):
    code, _, err = run_main([*argv, "--temperature", "0", "--json", json_path], capsys)
    assert code == 0, err
    return [r["token_ids"] for r in json.loads(Path(json_path).read_text())["rows"]]


def test_package_greedy_equals_eager(exported, tmp_path, capsys):
    """Eager equals --compile (test_generate.py, and on CUDA the GPU test below), so this is the
    package against both; --compile on 2 CPU cores would double this module's time."""
    ckpt, pkg = exported
    # a one-token prompt beside one longer than the prefill length (two prefill calls, 16 + 9 tokens)
    batch = ["--checkpoint", ckpt, "--prompt", "Hi", "--prompt", LONG, "--max-new-tokens", "20"]
    packaged = token_ids([*batch, "--package", pkg], capsys, tmp_path / "p.json")
    assert packaged == token_ids(batch, capsys, tmp_path / "e.json")
    # one prompt in a package made for two: the filler row changes nothing
    alone = ["--checkpoint", ckpt, "--prompt", LONG, "--max-new-tokens", "20", "--package", pkg]
    assert token_ids(alone, capsys, tmp_path / "a.json")[0] == packaged[1]


def test_chat_through_the_package_equals_eager(exported, tmp_path, capsys, monkeypatch):
    ckpt, pkg = exported
    turns = {}
    for name, extra in (("package", ["--package", pkg]), ("eager", ["--max-seq-length", str(SLOTS)])):
        monkeypatch.setattr("sys.stdin", io.StringIO("hi there\nhow are you today\n"))
        argv = ["--checkpoint", ckpt, "--chat", "--temperature", "0", "--max-new-tokens", "8", *extra]
        code, _, err = run_main([*argv, "--json", tmp_path / f"{name}.json"], capsys)
        assert code == 0, err
        turns[name] = json.loads((tmp_path / f"{name}.json").read_text())["turns"]
    assert turns["package"] == turns["eager"]
    assert turns["eager"][1]["cache_slots_used"] > turns["eager"][0]["cache_slots_used"] > 0


def test_package_writes_the_models_own_cache(exported):
    """The programs write K/V into the model's cache tensors (user-managed constants), the values
    eager writes; prefill and decode share them."""
    ckpt, pkg = exported
    model, _ = load_model(ckpt, "cpu", torch.float32)
    package = Package(pkg, model, read_metadata(pkg))
    tokens = torch.randint(0, 1000, (BATCH, 12), generator=torch.Generator().manual_seed(0))
    row_start = torch.tensor([0, 5], dtype=torch.int32)
    model.set_row_starts(row_start)
    with torch.no_grad():
        package.step(model, tokens[:, :11], torch.arange(11), generate.Sampling())
        package.step(model, tokens[:, 11:], torch.tensor([11]), generate.Sampling())
        written = [
            (layer.attention.kv_cache.k_cache.clone(), layer.attention.kv_cache.v_cache.clone())
            for layer in model.layers
        ]
        assert all(k[:, :, :12].abs().sum() > 0 for k, _ in written)
        for layer in model.layers:
            layer.attention.kv_cache.k_cache.zero_()
            layer.attention.kv_cache.v_cache.zero_()
        model(tokens, torch.arange(12))
    for b, start in enumerate(row_start.tolist()):  # the valid slots of each row (pad slots may differ)
        for (k, v), layer in zip(written, model.layers):
            cache = layer.attention.kv_cache
            torch.testing.assert_close(k[b, :, start:12], cache.k_cache[b, :, start:12])
            torch.testing.assert_close(v[b, :, start:12], cache.v_cache[b, :, start:12])


def test_a_lost_cache_write_fails_the_export(monkeypatch):
    """The export checks that every cache buffer is a mutation of the exported program: a cache
    that writes into a copy (what a rebound attribute does) is caught there, not at run time."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=64))
    model.setup_caches(1, 32)  # the real cache passes the same check in export_package (the fixture)

    def update_a_copy(self, input_pos, k, v):
        self.k_cache.clone().index_copy_(2, input_pos, k)  # the write lands in a copy
        self.v_cache.index_copy_(2, input_pos, v)

    monkeypatch.setattr(KVCache, "update", update_a_copy)
    with pytest.raises(PackageError, match=r"does not write model\.layers\.0\.attention\.kv_cache\.k_cache"):
        export_steps(model, 1, 8, programs=("decode",))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "bf16"], "made for float32 but this run asks for bfloat16"),
        (["--prompt", "a", "--prompt", "b", "--prompt", "c"], "3 prompts but tiny.pt2 was exported for a batch of 2"),
        (["--max-new-tokens", "100"], "cache slots asked for but tiny.pt2 was exported with 64"),
        (["--max-seq-length", "128", "--chat"], "128 cache slots asked for but tiny.pt2 was exported with 64"),
        (["--compile"], "--package runs the steps compiled into it"),
    ],
)
def test_bad_requests_are_one_line_exit_2(exported, capsys, extra, message):
    ckpt, pkg = exported
    argv = ["--checkpoint", ckpt, "--package", pkg, "--temperature", "0", "--max-new-tokens", "8", *extra]
    code, _, err = run_main(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err


def test_package_for_another_checkpoint_is_refused(exported, tmp_path, capsys):
    ckpt, pkg = exported
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, vocab_size=49152)
    other = save_checkpoint(
        tmp_path / "other",
        {"model_args": asdict(args), "quantization": None},
        Transformer(args).state_dict(),
        {f.name: f for f in ckpt.iterdir() if f.name.startswith("tokenizer")},
    )
    code, _, err = run_main(["--checkpoint", other, "--package", pkg], capsys)
    assert code == 2 and f"was made for checkpoint {ckpt}" in err and f"{other} has id" in err, err
    assert len(err.strip().splitlines()) == 1


def test_package_for_another_device_or_torch_is_refused(exported):
    ckpt, pkg = exported
    meta = read_metadata(pkg)
    with pytest.raises(PackageError, match="made for cuda but this run is on cpu"):
        check_package({**meta, "device": "cuda"}, pkg, ckpt, torch.device("cpu"), torch.float32)
    with pytest.raises(PackageError, match=r"made with torch 2\.0\.0 but this is torch"):
        check_package({**meta, "torch_version": "2.0.0"}, pkg, ckpt, torch.device("cpu"), torch.float32)
    check_package(meta, pkg, ckpt, torch.device("cpu"), torch.float32)


def test_cuda_packages_are_refused_in_one_line(monkeypatch):
    from package import CUDA_PACKAGES_ENV, check_cuda_packages_allowed

    monkeypatch.delenv(CUDA_PACKAGES_ENV, raising=False)
    with pytest.raises(PackageError, match="CUDA packages are not supported yet"):
        check_cuda_packages_allowed(torch.device("cuda"))
    check_cuda_packages_allowed(torch.device("cpu"))
    monkeypatch.setenv(CUDA_PACKAGES_ENV, "1")
    check_cuda_packages_allowed(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(
    os.environ.get("FASTGEN_PACKAGE_CUDA") != "1",
    reason="CUDA packages segfault at load on torch 2.11 (package.py); FASTGEN_PACKAGE_CUDA=1 runs this",
)
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_cuda_package_equals_cpu_eager_and_compile(tmp_path, cuda_graph):
    """On CUDA (flex_attention in the package): greedy tokens equal CPU fp32 eager and --compile
    for a batch of different-length prompts, with and without the CUDA graph around decode."""
    from package import PackageGenerator

    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128, intermediate_size=512, vocab_size=512)
    model = Transformer(args)
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, 1.0)
    ckpt = save_checkpoint(tmp_path / "m", {"model_args": asdict(args), "quantization": None}, model.state_dict())
    pkg = tmp_path / "m.pt2"
    export_package(ckpt, pkg, 3, 256, torch.float32, "cuda", 32, log=lambda s: None)
    prompts = [[5, 17, 3, 88, 41, 2, 9, 300, 411, 7], [60, 1, 7], list(range(100, 141))]

    def greedy(generator):
        generator.setup(len(prompts), 100)
        return generator.generate(prompts, 30, generate.Sampling()).tokens

    cpu, _ = load_model(ckpt, "cpu", torch.float32)
    cuda, _ = load_model(ckpt, "cuda", torch.float32)
    expected = greedy(generate.Generator(cpu))
    assert greedy(generate.Generator(cuda, compile=True)) == expected
    packaged, _ = load_model(ckpt, "cuda", torch.float32)
    generator = PackageGenerator.load(pkg, read_metadata(pkg), packaged, cuda_graph=cuda_graph)
    assert greedy(generator) == expected


def test_cuda_package_diagnosis_runs_its_control_on_the_cpu(capsys):
    """scripts/diag_cuda_package.py (what the GPU machine runs for issue 19): on the CPU our way of
    packaging loads in a child process and its step equals the eager one; a wrong variant is exit 2."""
    from scripts import diag_cuda_package

    assert diag_cuda_package.main(["--device", "cpu", "--variants", "ours"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("ours: built in") and "runs: greedy token equal" in last, last
    assert diag_cuda_package.main(["--device", "cpu", "--variants", "nonsense"]) == 2
