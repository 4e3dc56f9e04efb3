"""The command line both converters share (convert_hf_checkpoint.py, convert_gguf.py): one source,
--output-dir, --dtype, --force; errors as one line `error: ...` with exit code 2."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import OutputExistsError  # noqa: E402
from common import DTYPES  # noqa: E402
from errors import FastgenError, first_line  # noqa: E402


def error_line(e: BaseException) -> str:
    """The one line a converter CLI prints for a FastgenError or OSError, worded with its flags."""
    hint = "; pass --force to overwrite it" if isinstance(e, OutputExistsError) else ""
    return f"error: {first_line(e)}{hint}"


def converter_main(
    argv,
    description: str,
    convert,
    source_flag: str,
    source_help: str,
    output_help: str,
    dtype_help: str,
    output_required: bool = False,
):
    """Parse the converter flags and run convert(source, output_dir, dtype, force)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(source_flag, required=True, type=Path, dest="source", help=source_help)
    p.add_argument("--output-dir", type=Path, required=output_required, default=None, help=output_help)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory (default: off)")
    a = p.parse_args(argv)
    try:
        convert(a.source, a.output_dir, a.dtype, a.force)
    except (FastgenError, OSError) as e:  # anything else is a bug: its traceback shows
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
