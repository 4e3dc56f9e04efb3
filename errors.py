"""The one error base class of fastgen, and how an error becomes one line.

Every error the project raises on purpose (a bad checkpoint, a bad request, a quantization or
tokenizer problem) derives from FastgenError. The CLIs print FastgenError and OSError as one line
`error: ...` and exit with code 2; any other exception is a bug and keeps its traceback. Library
messages name the problem and the fix in library terms, never a CLI flag: the CLI that owns the
flag words that. Imports nothing, so tokenizer.py stays free of torch.
"""


class FastgenError(Exception):
    """A problem with the input (files, arguments, environment) that the user can fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: errors we re-raise stay one line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""
