"""Export the model's prefill and decode steps with torch.export and compile them with AOTInductor
into one package, so generate.py starts without compiling anything:

python scripts/export.py --checkpoint checkpoints/SmolLM2-135M-Instruct --output smollm2.pt2
python generate.py --checkpoint checkpoints/SmolLM2-135M-Instruct --package smollm2.pt2 --temperature 0

Static shapes: the batch size and the cache length are fixed at export; prefill takes 2 to
--prefill-len tokens per row per call (a dynamic dimension, so a short prompt is not padded).
Weights are not in the package: generate.py loads them from the checkpoint (memory-mapped) and
hands them to both programs, so the package is small and its checkpoint stays the one copy.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from checkpoint import load_model  # noqa: E402
from common import DTYPES  # noqa: E402
from errors import FastgenError  # noqa: E402
from package import (  # noqa: E402
    METADATA_KEY,
    PACKAGE_FORMAT,
    PROGRAMS,
    PackagedStep,
    PackageError,
    check_cuda_packages_allowed,
    checkpoint_identity,
    torch_release,
)


def cache_buffers(model) -> list[str]:
    """The names (as PackagedStep sees them) of every buffer a step must write in place."""
    names = ["model.row_start"]
    for i, layer in enumerate(model.layers):
        for buf, _ in layer.attention.kv_cache.named_buffers():
            names.append(f"model.layers.{i}.attention.kv_cache.{buf}")
    return names


def check_writes_survive(program: torch.export.ExportedProgram, model, name: str):
    """Every cache and step-state write must be a buffer mutation of the exported program: a write
    lost in tracing (a rebound attribute, a copy written instead of the buffer) would make a
    program that runs and silently forgets its cache."""
    # the functional (decomposed) form names each mutation; the program compiled is the original
    mutated = set(program.run_decompositions({}).graph_signature.buffers_to_mutate.values())
    lost = [b for b in cache_buffers(model) if b not in mutated]
    if lost:
        raise PackageError(f"the exported {name} program does not write {lost[0]} ({len(lost)} buffers in all)")


def export_steps(
    model, batch_size: int, prefill_len: int, programs=PROGRAMS, attention: str = "sdpa"
) -> dict[str, torch.export.ExportedProgram]:
    """torch.export the steps, attending through `attention` ("flex" or "sdpa")."""
    device = model.tok_embeddings.weight.device
    step = PackagedStep(model)
    row_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
    model.export_attention = attention
    try:
        exported = _export(step, batch_size, prefill_len, programs, device, row_start)
    finally:
        model.export_attention = None
    for name, program in exported.items():
        check_writes_survive(program, model, name)
    return exported


def _export(step, batch_size, prefill_len, programs, device, row_start):
    exported = {}
    with torch.no_grad():
        decode_args = (torch.zeros(batch_size, 1, dtype=torch.long, device=device), torch.tensor([0], device=device))
        if "decode" in programs:
            exported["decode"] = torch.export.export(step, (*decode_args, row_start))
        # Dim.AUTO with bounds: torch's solver cannot prove some guards of the attention for a named
        # Dim over the whole range, though they hold; AUTO keeps the dimension dynamic anyway.
        n = max(2, min(prefill_len, 16))
        length = torch.export.Dim.AUTO(min=2, max=prefill_len)
        prefill_args = (torch.zeros(batch_size, n, dtype=torch.long, device=device), torch.arange(n, device=device))
        if "prefill" in programs:
            exported["prefill"] = torch.export.export(
                step, (*prefill_args, row_start), dynamic_shapes=({1: length}, {0: length}, None)
            )
    return exported


def export_package(
    checkpoint,
    output,
    batch_size: int = 1,
    max_seq_len: int = 2048,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    prefill_len: int = 512,
    attention: str = "auto",
    log=print,
) -> dict:
    """Export and compile the steps of `checkpoint` into the package `output` (written to a temp
    file renamed into place). Returns the package's metadata, with the phases' timings."""
    from torch._inductor.package import package_aoti

    device = torch.device(device)
    output = Path(output)
    if output.suffix != ".pt2":
        raise PackageError(f"the package file must end in .pt2 (got {output})")
    t0 = time.perf_counter()
    model, config = load_model(checkpoint, device, dtype)
    if config.get("quantization"):
        raise PackageError(f"{checkpoint} is quantized ({config['quantization']['mode']}); export a float checkpoint")
    if max_seq_len > model.args.max_position_embeddings:
        raise PackageError(
            f"max_seq_len {max_seq_len} exceeds the model's context of {model.args.max_position_embeddings} tokens"
        )
    if not 2 <= prefill_len <= max_seq_len:
        raise PackageError(f"prefill_len must be in [2, max_seq_len={max_seq_len}] (got {prefill_len})")
    # flex_attention (what --compile runs) where AOTInductor lowers it, CUDA; SDPA over the dense
    # offset-plus-length mask elsewhere (AOTInductor has no CPU flex_attention).
    if attention == "auto":
        attention = "flex" if device.type == "cuda" else "sdpa"
    model.setup_caches(batch_size, max_seq_len)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    programs = export_steps(model, batch_size, prefill_len, attention=attention)
    export_s = time.perf_counter() - t0
    log(f"Exported prefill and decode in {export_s:.1f} s")

    meta = {
        "format": PACKAGE_FORMAT,
        "checkpoint": str(checkpoint),
        "checkpoint_id": checkpoint_identity(checkpoint),
        "model_args": asdict(model.args),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
        "prefill_len": prefill_len,
        "cache_shape": list(model.layers[0].attention.kv_cache.k_cache.shape),
        "attention": attention,
        "torch_version": torch_release(torch.__version__),
    }
    options = {
        "aot_inductor.package": True,
        "aot_inductor.package_constants_in_so": False,  # weights come from the checkpoint at run time
        "aot_inductor.metadata": {METADATA_KEY: json.dumps(meta)},
    }
    t0 = time.perf_counter()
    files = {}
    with torch.no_grad():
        for name, program in programs.items():
            files[name] = torch._inductor.aot_compile(program.module(), program.example_inputs[0], options=options)
            log(f"Compiled {name} in {time.perf_counter() - t0:.1f} s")
    compile_s = time.perf_counter() - t0

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".pt2", dir=output.parent)
    os.close(fd)
    try:
        package_aoti(tmp, files)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise
    return {**meta, "load_s": load_s, "export_s": export_s, "compile_s": compile_s}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--output", type=Path, required=True, metavar="PKG.pt2", help="the package file to write")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="rows per call, fixed (default: 1)")
    p.add_argument(
        "--max-seq-len", type=int, default=2048, metavar="L", help="KV cache slots per row, fixed (default: 2048)"
    )
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present, else cpu)")
    p.add_argument(
        "--prefill-len", type=int, default=512, metavar="P", help="most prompt tokens per prefill call (default: 512)"
    )
    p.add_argument(
        "--attention",
        choices=("auto", "flex", "sdpa"),
        default="auto",
        help="flex_attention (CUDA only) or SDPA over a dense mask (default: auto = flex on cuda, sdpa on cpu)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the metadata and timings here")
    return p


def main(argv=None) -> int:
    from common import write_json_atomic

    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PackageError("--device cuda: CUDA is not available here; use --device cpu")
        check_cuda_packages_allowed(device)
        default = torch.bfloat16 if device.type == "cuda" else torch.float32
        if args.dtype is not None and args.dtype not in DTYPES:
            raise PackageError(f"unknown --dtype {args.dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[args.dtype] if args.dtype else default
        if args.batch_size < 1:
            raise PackageError(f"--batch-size must be at least 1 (got {args.batch_size})")
        if args.attention == "flex" and device.type != "cuda":
            raise PackageError("--attention flex needs --device cuda (AOTInductor has no CPU flex_attention)")
        t0 = time.perf_counter()
        info = export_package(
            args.checkpoint,
            args.output,
            args.batch_size,
            args.max_seq_len,
            dtype,
            device,
            args.prefill_len,
            args.attention,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except (FastgenError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info["total_s"] = time.perf_counter() - t0
    print(
        f"Wrote {args.output}: batch {info['batch_size']}, {info['max_seq_len']} slots, prefill up to "
        f"{info['prefill_len']}, {info['dtype']} on {info['device']}; load {info['load_s']:.1f} s, export "
        f"{info['export_s']:.1f} s, compile {info['compile_s']:.1f} s",
        file=sys.stderr,
    )
    if args.json is not None:
        write_json_atomic(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
