"""Tensor parallelism: one model across the ranks that torchrun starts, over torch.distributed.

    torchrun --standalone --nproc-per-node 2 generate.py --checkpoint DIR --prompt "Hello"

Each rank builds a smaller model of the same family, its own slice (Megatron-style):
- attention: wqkv split by output rows per head group (rank r keeps q heads r*Hq/N.. and the kv
  heads they share, so GQA groups stay whole), wo split by input columns; the MLP alike, w13 by
  rows (the gate half and the up half sliced the same way) and w2 by columns. The partial
  outputs of wo and w2 are summed over the ranks by an all-reduce, a forward hook on each.
- ModelArgs of the slice: n_heads / N, n_kv_heads / N, intermediate_size / N (head_dim kept), so
  setup_caches gives each rank a KV cache of its own kv heads only and model.py runs unchanged.
- embedding, norms and the output projection are replicated: the lookup reads B rows, not the
  table; a replicated output gives every rank the same logits with no gather, so every rank
  samples the same token (README says what vocab-parallel would save).
- quantized checkpoints are sliced as stored: int8 weight and scales by the same output rows
  (input-column splits keep the per-output-channel scales whole); int4 packed weight by rows or
  by byte columns, scales_and_zeros along its n or group axis, so every group stays on one rank.

Loading reads only this rank's slice of each tensor from the memory-mapped safetensors file
(checkpoint.load_model(..., shard=Shard(...))). The all-reduce is a functional collective
(torch.distributed._functional_collectives), which torch.compile captures into the decode step:
NCCL on GPUs, gloo on the CPU.
"""

import atexit
import os
import resource
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn

from errors import FastgenError


class TensorParallelError(FastgenError):
    """A model or machine that cannot be split this way; the message names the sizes."""


# ----------------------------------------------------------------------------- process group


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def maybe_init(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU),
    pick this rank's device (cuda:LOCAL_RANK), and silence every rank but 0 (errors excepted).
    Otherwise nothing happens and `device` comes back as it is."""
    if not launched_by_torchrun() or dist.is_initialized():
        return local_device(device) if dist.is_initialized() else device
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(dist.destroy_process_group)
    if not is_rank0():
        quiet_this_rank()
    return device


def local_device(device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK for a GPU run; the CPU as asked."""
    if device.type != "cuda":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    gpus = torch.cuda.device_count()
    if per_node > gpus:
        raise TensorParallelError(
            f"{per_node} ranks per node but this node has {gpus} GPU(s); use --nproc-per-node {gpus} or fewer"
        )
    return torch.device("cuda", local_rank)


def quiet_this_rank():
    """Ranks other than 0 print nothing (rank 0 streams the text and reports for all), except a
    traceback, which goes to the real stderr with the rank named."""
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr = devnull
    this_rank = rank()

    def excepthook(kind, value, tb):
        import traceback

        print(f"[rank {this_rank}]", "".join(traceback.format_exception(kind, value, tb)), file=sys.__stderr__)

    sys.excepthook = excepthook


def print0(*args, **kwargs):
    """print on rank 0 only (for code that runs before the other ranks are silenced, or in scripts)."""
    if is_rank0():
        print(*args, **kwargs)


def peak_host_memory_bytes() -> int:
    """This process's peak resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order; [value] without a process group."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def report_ranks(token_rows: list[list[int]]) -> dict:
    """After a generation, on every rank: check that all ranks generated the same tokens, and
    gather each rank's peak host memory (printed by rank 0). Returns the fields for --json."""
    tokens, host_bytes = zip(*gather((token_rows, peak_host_memory_bytes())))
    bad = [r for r, other in enumerate(tokens) if other != tokens[0]]
    if bad:
        raise TensorParallelError(f"rank(s) {bad} generated other tokens than rank 0; the ranks diverged")
    if world_size() > 1:
        per_rank = ", ".join(f"{b / 1e9:.2f}" for b in host_bytes)
        print0(f"Tensor parallel over {world_size()} ranks; peak host memory per rank: {per_rank} GB", file=sys.stderr)
    return {"world_size": world_size(), "peak_host_memory_bytes_per_rank": list(host_bytes)}


def readline0(stream) -> str:
    """A line of `stream` read by rank 0 and given to every rank (chat: torchrun hands the
    terminal's stdin to every rank, and only one may read each line)."""
    if world_size() == 1:
        return stream.readline()
    line = [stream.readline() if is_rank0() else None]
    dist.broadcast_object_list(line, src=0)
    return line[0]


# ----------------------------------------------------------------------------- sharding plan


class Shard:
    """This rank's slice of a model: what checkpoint.load_model asks while it builds and reads it.

    local_args(args, quantization) -> the ModelArgs of the slice (checks the sizes divide)
    full_shape(name, shape)        -> the file's shape of a tensor this rank holds `shape` of
    read(name, file_slice)         -> this rank's part, read from a safetensors slice
    add_all_reduces(model)         -> the forward hooks that sum the row-split outputs
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.args = None  # the whole model's, set by local_args

    def local_args(self, args, quantization: dict | None = None):
        n = self.world_size
        sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "intermediate_size": args.intermediate_size}
        bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
        if bad:
            raise TensorParallelError(
                f"cannot split this model over {n} ranks: {', '.join(bad)} not divisible by {n} "
                f"(n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, intermediate_size={args.intermediate_size})"
            )
        if quantization and quantization.get("mode") == "int4":
            g = quantization["groupsize"]
            for what, k in (("wo", args.n_heads * args.head_dim // n), ("w2", args.intermediate_size // n)):
                if k % g:
                    raise TensorParallelError(
                        f"int4 group size {g} does not divide {what}'s {k} input features per rank "
                        f"over {n} ranks; quantize with a group size that does, or use fewer ranks"
                    )
        self.args = args
        return replace(
            args,
            n_heads=args.n_heads // n,
            n_kv_heads=args.n_kv_heads // n,
            head_dim=args.head_dim,  # explicit: dim // (n_heads / N) would be wrong
            intermediate_size=args.intermediate_size // n,
        )

    def split(self, name: str):
        """(axis, parts) of a split tensor, or None when every rank holds all of it. Each part of
        the axis (wqkv's q, k and v rows, in heads; w13's gate and up halves) is cut into N
        equal pieces and the rank keeps piece `rank` of each."""
        a = self.args
        module, _, kind = name.rpartition(".")
        if module.endswith("attention.wqkv"):
            parts = (a.n_heads, a.n_kv_heads, a.n_kv_heads)
        elif module.endswith("feed_forward.w13"):
            parts = (1, 1)
        elif module.endswith(("attention.wo", "feed_forward.w2")):  # split by input features
            if kind == "weight":
                return 1, (1,)
            if kind == "scales_and_zeros":  # int4 [in/groupsize, out, 2]
                return 0, (1,)
            return None  # int8 per-output-channel scales: whole on every rank
        else:
            return None
        # split by output rows: weight [out, ..], int8 scales [out], bias [out]; int4 scales_and_zeros [.., out, 2]
        return (1 if kind == "scales_and_zeros" else 0), parts

    def full_shape(self, name: str, shape) -> tuple:
        split = self.split(name)
        if split is None:
            return tuple(shape)
        axis = split[0]
        return tuple(s * self.world_size if i == axis else s for i, s in enumerate(shape))

    def read(self, name: str, file_slice) -> torch.Tensor:
        split = self.split(name)
        if split is None:
            return file_slice[:]
        axis, parts = split
        length = file_slice.get_shape()[axis]
        unit = length // sum(parts)
        pieces, start = [], 0
        for p in parts:
            piece = p * unit // self.world_size
            lo = start + self.rank * piece
            index = (slice(None),) * axis + (slice(lo, lo + piece),)
            pieces.append(file_slice[index])  # reads only these bytes of the memory-mapped file
            start += p * unit
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)

    def add_all_reduces(self, model: nn.Module):
        for layer in model.layers:
            layer.attention.wo.register_forward_hook(all_reduce_output)
            layer.feed_forward.w2.register_forward_hook(all_reduce_output)
        return model


def all_reduce_output(module, inputs, output):
    """Sum a row-split Linear's partial output over the ranks. A functional collective: traced by
    torch.compile into the step (NCCL kernels in the CUDA graph), eager otherwise."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def shard_for_this_rank() -> Shard | None:
    """The Shard of this rank, or None when running as one process."""
    return Shard(rank(), world_size()) if world_size() > 1 else None


def use_symmetric_memory_all_reduce():
    """Compiled steps lower each all-reduce of up to 128 KiB to PyTorch's symmetric-memory one-shot
    all-reduce instead of NCCL (peer-to-peer loads over NVLink; no NVLink multicast needed).
    CUDA and --compile only."""
    from torch._inductor import config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    enable_symm_mem_for_group(dist.group.WORLD.group_name)
    inductor_config._collective.auto_select = True
