"""Download a Hugging Face model repo and convert it into our checkpoint format.

    python scripts/download.py --repo-id ORG/NAME [--output-dir checkpoints/NAME] [--hf-token TOKEN]

The raw HF files go to the huggingface_hub cache; the converted checkpoint to --output-dir.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import CheckpointError, OutputExistsError  # noqa: E402
from common import DTYPES  # noqa: E402
from errors import FastgenError, first_line  # noqa: E402
from scripts.convert_hf_checkpoint import TOKENIZER_FILES, convert_hf_checkpoint  # noqa: E402
from scripts.converter_cli import error_line  # noqa: E402

# config + weights + tokenizer; never the .pth/.gguf/onnx copies some repos also carry
ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    *TOKENIZER_FILES,
]


def download(repo_id: str, hf_token: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            "huggingface_hub is not installed; run: pip install -r requirements-optional.txt"
        ) from None
    try:
        path = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, token=hf_token)
    except Exception as e:  # offline, gated repo, bad name: the hub raises many types
        raise CheckpointError(
            f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: {first_line(e)})"
        ) from None
    return Path(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo-id", required=True, help="the hub repo, e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--output-dir", type=Path, default=None, help="where to write (default: checkpoints/<NAME>)")
    p.add_argument("--hf-token", default=os.environ.get("HF_TOKEN"), help="for gated repos (default: $HF_TOKEN)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default: as stored)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory (default: off)")
    a = p.parse_args(argv)
    out_dir = a.output_dir or Path("checkpoints") / a.repo_id.split("/")[-1]
    try:
        if out_dir.exists() and not a.force:
            raise OutputExistsError(f"{out_dir} already exists")
        hf_dir = download(a.repo_id, a.hf_token)
        convert_hf_checkpoint(hf_dir, out_dir, a.dtype, a.force, source=f"hf:{a.repo_id}")
    except (FastgenError, OSError) as e:  # anything else is a bug: its traceback shows
        print(error_line(e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
