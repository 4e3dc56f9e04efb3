"""Converters on real and broken inputs: the SmolLM2 GGUF against transformers' own GGUF loader,
and bad files / configs / output dirs -> a one-line error naming the file, exit code 2, nothing written."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint_tensors, model_args_from_dict, model_args_from_name, read_checkpoint_config
from model import Transformer

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is"


def load_ours(ckpt_dir) -> Transformer:
    args = model_args_from_dict(read_checkpoint_config(ckpt_dir)["model_args"])
    model = Transformer(args)
    model.load_state_dict(load_checkpoint_tensors(ckpt_dir, model.state_dict(), "cpu", torch.float32))
    return model.eval()


def test_gguf_model_args_and_files(smollm2_checkpoint):
    config = read_checkpoint_config(smollm2_checkpoint)
    assert model_args_from_dict(config["model_args"]) == model_args_from_name("smollm2-135m")
    assert config["quantization"] is None
    assert config["source"].startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf") and "/" not in config["source"]
    assert (smollm2_checkpoint / "tokenizer.json").is_file()
    assert (smollm2_checkpoint / "tokenizer_config.json").is_file()
    # the GGUF's tokenizer.chat_template lands in tokenizer_config.json, and is what chat renders
    tokenizer_config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    from tokenizer import load_tokenizer

    assert load_tokenizer(smollm2_checkpoint).chat_format == "template"


@torch.no_grad()
def test_gguf_logits_match_transformers_gguf_loader(smollm2_checkpoint, tmp_path):
    """transformers dequantizes the same GGUF with the gguf package and undoes llama.cpp's Q/K
    permutation with its own code: our logits must equal its LlamaForCausalLM's to fp32 rounding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from scripts.assets import smollm2_gguf_path
    from tokenizer import load_tokenizer

    gguf_path = smollm2_gguf_path()
    (tmp_path / gguf_path.name).symlink_to(gguf_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name, dtype=torch.float32)
    hf.eval()
    ids = torch.tensor([load_tokenizer(smollm2_checkpoint).encode(PROMPT)])
    ours = load_ours(smollm2_checkpoint)
    ours.setup_caches(1, ids.shape[1])
    logits = ours(ids, torch.arange(ids.shape[1]))
    ref = hf(ids).logits.float()
    err = ((logits - ref).norm() / ref.norm()).item()
    assert err < 1e-4, f"rel err {err:.2e}"
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


# ----------------------------------------------------------------------------- bad input, via the CLIs


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf") / "tiny"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def run_cli(script, *args):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)], capture_output=True, text=True, cwd=REPO
    )
    return proc.returncode, proc.stderr.strip()


def assert_one_line_error(rc, stderr, *must_contain):
    assert rc == 2, stderr
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    for s in must_contain:
        assert str(s) in stderr, stderr


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs


def copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_gguf(tmp_path):
    from scripts.assets import smollm2_gguf_path

    bad = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    out = tmp_path / "out"
    rc, err = run_cli("convert_gguf.py", "--gguf", bad, "--output-dir", out)
    assert_one_line_error(rc, err, bad)
    assert_nothing_written(out)


def test_truncated_safetensors(tiny_hf_dir, tmp_path):
    hf = copy_hf(tiny_hf_dir, tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    rc, err = run_cli("convert_hf_checkpoint.py", "--checkpoint-dir", hf, "--output-dir", out)
    assert_one_line_error(rc, err, weights)
    assert_nothing_written(out)


def test_missing_config(tiny_hf_dir, tmp_path):
    hf = copy_hf(tiny_hf_dir, tmp_path / "hf")
    (hf / "config.json").unlink()
    out = tmp_path / "out"
    rc, err = run_cli("convert_hf_checkpoint.py", "--checkpoint-dir", hf, "--output-dir", out)
    assert_one_line_error(rc, err, hf / "config.json")
    assert_nothing_written(out)


def test_hf_tokenizer_files_are_copied(tiny_hf_dir, tmp_path):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja travel
    with the weights, and the converted checkpoint chats with the template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from tokenizer import load_tokenizer

    hf = copy_hf(tiny_hf_dir, tmp_path / "hf")
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "user": 2, "hi": 3, ":": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>"])
    backend.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (hf / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    (hf / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    out = convert_hf_checkpoint(hf, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (hf / name).read_bytes()
    tok = load_tokenizer(out)
    assert tok.eos_id == 1 and tok.chat_format == "template"
    assert tok.encode_chat_turn("hi") == [2, 4, 3, 1, 0, 4]  # "assistant" is not in this vocabulary: [UNK]


def test_shape_mismatch_and_unsupported_model_type(tiny_hf_dir, tmp_path):
    from checkpoint import CheckpointError
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint

    hf = copy_hf(tiny_hf_dir, tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=80)))
    out = tmp_path / "out"
    rc, err = run_cli("convert_hf_checkpoint.py", "--checkpoint-dir", hf, "--output-dir", out)
    # the first tensor whose shape depends on intermediate_size, with both shapes
    assert_one_line_error(
        rc, err, hf / "model.safetensors", "model.layers.0.mlp.gate_proj.weight", "[64, 32]", "[80, 32]"
    )
    assert_nothing_written(out)
    (hf / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):  # in-process: same code path
        convert_hf_checkpoint(hf, out)
    assert_nothing_written(out)


def test_output_exists_needs_force(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_cli("convert_hf_checkpoint.py", "--checkpoint-dir", tiny_hf_dir, "--output-dir", out)
    assert_one_line_error(rc, err, out, "--force")
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    rc, err = run_cli(
        "convert_hf_checkpoint.py", "--checkpoint-dir", tiny_hf_dir, "--output-dir", out, "--force", "--dtype", "bf16"
    )
    assert rc == 0, err
    assert not (out / "keep.txt").exists()
    args = model_args_from_dict(read_checkpoint_config(out)["model_args"])
    tensors = load_checkpoint_tensors(out, Transformer(args).state_dict(), "cpu", None)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    # the source is recorded by name: no local path leaks into a checkpoint people share
    assert read_checkpoint_config(out)["source"] == tiny_hf_dir.name
    assert str(tiny_hf_dir.parent) not in (out / "config.json").read_text()


def test_output_overlapping_the_source_is_refused_even_with_force(tiny_hf_dir, tmp_path):
    from checkpoint import CheckpointError
    from scripts.convert_gguf import convert_gguf
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint

    hf = copy_hf(tiny_hf_dir, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for out, relation in ((hf, "is"), (hf / "converted", "is inside"), (tmp_path, "contains")):
        with pytest.raises(CheckpointError, match=f"{relation} the source"):
            convert_hf_checkpoint(hf, out, force=True)
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    # a GGUF file inside the output directory (here a symlink to it: the link would be deleted too);
    # refused before the file is even read
    from scripts.assets import smollm2_gguf_path

    models = tmp_path / "models"
    models.mkdir()
    (models / "model.gguf").symlink_to(smollm2_gguf_path())
    for out, relation in ((models, "contains"), (models / "model.gguf", "is")):
        with pytest.raises(CheckpointError, match=f"{relation} the source"):
            convert_gguf(models / "model.gguf", out, force=True)
    assert (models / "model.gguf").is_file()
    rc, err = run_cli("convert_hf_checkpoint.py", "--checkpoint-dir", hf, "--output-dir", hf, "--force")
    assert_one_line_error(rc, err, "is the source")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_conversion_shows_one_progress_bar_not_a_line_per_layer(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint

    convert_hf_checkpoint(tiny_hf_dir, tmp_path / "log")
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2 and captured.err == ""  # "converting ...", "wrote ...": nothing per layer
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    convert_hf_checkpoint(tiny_hf_dir, tmp_path / "tty")
    assert capsys.readouterr().out.count("\n") == 2
    assert "converting:" in terminal.getvalue() and "\n" not in terminal.getvalue()  # one bar redrawn in place
