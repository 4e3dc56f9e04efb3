"""Small helpers the CLIs, the scripts and the benchmark share: dtype names, peak memory and
atomic JSON writes.

Imports torch and the standard library only: the benchmark's gpt-fast child process imports it
(through scripts/bench_common.py) next to gpt-fast's own model.py and generate.py.
"""

import json
import os
import resource
import tempfile
from pathlib import Path

import torch

# Compute dtypes by the names the CLIs accept.
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def peak_memory_bytes(device) -> int:
    """Peak allocated GPU memory on CUDA; on the CPU the process's peak resident set (process-wide)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_json_atomic(path, data, **dump_kwargs):
    """json.dump `data` to `path` through a temporary file renamed into place: a reader never sees
    half a file. dump_kwargs go to json.dump (default indent=2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, **{"indent": 2, **dump_kwargs})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
