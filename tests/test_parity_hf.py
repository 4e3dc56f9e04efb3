"""Parity with Hugging Face transformers on tiny random models of every supported family.

Each test builds an fp32 HF model with random weights (norms and biases random too), saves it,
runs scripts/convert_hf_checkpoint.py on it, loads our checkpoint and checks prefill logits and
24 greedy decode steps through our static KV cache against HF recomputing the full sequence.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoint import load_checkpoint_tensors, model_args_from_dict, read_checkpoint_config  # noqa: E402
from model import Transformer  # noqa: E402
from scripts.convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402

PROMPT_LEN, DECODE_STEPS, TOL = 12, 24, 1e-4
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

FAMILIES = {
    "llama-2": ("LlamaConfig", dict(num_key_value_heads=4)),
    "codellama": (
        "LlamaConfig",
        dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "llama-3": (
        "LlamaConfig",
        dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    ),
    "llama-3.1": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-3.2": (
        "LlamaConfig",
        dict(num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True),
    ),
    "llama-linear-rope": (
        "LlamaConfig",
        dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "mistral-v0.1": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    "mistral-v0.3": (
        "MistralConfig",
        dict(num_key_value_heads=2, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen2.5": (
        "Qwen2Config",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "smollm2": (
        "LlamaConfig",
        dict(
            hidden_size=96,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        ),
    ),
}


def make_hf_model(family: str, seed: int = 0):
    cls_name, overrides = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so a wrong mapping of them cannot hide
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return hf.eval()


def load_ours(ckpt_dir) -> Transformer:
    args = model_args_from_dict(read_checkpoint_config(ckpt_dir)["model_args"])
    model = Transformer(args)
    model.load_state_dict(load_checkpoint_tensors(ckpt_dir, model.state_dict(), "cpu", torch.float32))
    return model.eval()


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


@torch.no_grad()
def check_parity(hf, ours: Transformer, seed: int = 1):
    vocab = hf.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    ours.setup_caches(1, PROMPT_LEN + DECODE_STEPS)
    logits = ours(prompt, torch.arange(PROMPT_LEN))
    ref = hf(prompt).logits.float()
    assert rel_err(logits, ref) < TOL, f"prefill rel err {rel_err(logits, ref):.2e}"
    seq, ours_tokens, ref_tokens = prompt, [], []
    tok = logits[:, -1].argmax(-1)
    for step in range(DECODE_STEPS):
        ours_tokens.append(tok.item())
        ref_tokens.append(ref[:, -1].argmax(-1).item())
        assert ours_tokens == ref_tokens, f"greedy tokens diverge at step {step}"
        seq = torch.cat([seq, tok.view(1, 1)], dim=1)
        pos = seq.shape[1] - 1
        logits = ours(tok.view(1, 1), torch.tensor([pos]))
        ref = hf(seq).logits[:, -1:].float()  # HF recomputes the whole sequence: no cache to trust
        err = rel_err(logits, ref)
        assert err < TOL, f"decode step {step} (slot {pos}) rel err {err:.2e}"
        tok = logits[:, -1].argmax(-1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity(family, tmp_path):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    out = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours = load_ours(out)
    expect_tied = bool(hf.config.tie_word_embeddings)
    assert ours.args.tie_embeddings == expect_tied and (ours.output is None) == expect_tied
    if family == "mistral-v0.1":
        assert ours.args.sliding_window == 8 and PROMPT_LEN + DECODE_STEPS > 3 * 8
    check_parity(hf, ours)


@pytest.mark.parametrize("layout", ["pytorch_bin", "sharded_safetensors"])
def test_other_weight_layouts(layout, tmp_path):
    hf = make_hf_model("llama-3", seed=3)
    if layout == "pytorch_bin":
        # transformers 5 writes safetensors only; write the legacy layout by hand.
        hf.config.save_pretrained(tmp_path / "hf")
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 3
    out = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", dtype="fp32")
    check_parity(hf, load_ours(out))
