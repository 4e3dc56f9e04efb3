"""An AOTInductor package of the model's prefill and decode steps (made by scripts/export.py), and
the runtime side: check it against the checkpoint and the request, and call its steps.

One .pt2 holds two compiled programs of the same step (`PackagedStep`): "decode" (tokens [B, 1])
and "prefill" (tokens [B, T], T from 2 to the exported prefill length). Neither holds weights or a
cache: both take every parameter and buffer from the model loaded at run time (AOTInductor's
user-managed constants), so the two programs share one copy of the weights and one KV cache, and
every cache write either makes lands in the tensors the other reads. The package records what it
was made for (model config, dtype, device, cache shape, torch version, the checkpoint's identity)
and a run is refused, in one line naming both sides, when any of them differs.
"""

import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

from errors import FastgenError
from generate import CUDAGraphStep, Generator, RowTokens, Sampling, UsageError, advancing, sample

PACKAGE_FORMAT = 1
METADATA_KEY = "fastgen"  # the package's metadata entry that holds our JSON
PROGRAMS = ("prefill", "decode")


class PackageError(FastgenError):
    """A package that cannot serve this checkpoint or request; the message names both sides."""


class PackagedStep(torch.nn.Module):
    """What is exported: one forward of the model that returns the greedy next token and the last
    logits. Everything it changes is written in place into buffers (the KV cache by the model,
    each row's first slot here), so the exported program keeps every write as a buffer mutation.
    Taking row_start as an input and copying it into the buffer keeps it a live tensor: a buffer
    the program only read would be folded into the compiled code as a constant."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, row_start):
        self.model.row_start.copy_(row_start)
        logits = self.model(tokens, input_pos, logits_to_keep=1)[:, -1]  # [B, V] fp32
        return logits.argmax(dim=-1, keepdim=True), logits


def constant_names(model) -> dict[str, torch.Tensor]:
    """The compiled programs' constants by name: every parameter and buffer of the model, under
    PackagedStep's attribute name."""
    return {f"model.{name}": t for name, t in [*model.named_parameters(), *model.named_buffers()]}


def checkpoint_identity(checkpoint_dir) -> str:
    """sha256 of config.json and model.safetensors' header (names, dtypes, shapes and offsets of
    every tensor): cheap to compute for any size, and it changes whenever the checkpoint does in
    a way the package could notice. (A re-save of other weights at the same shapes keeps it.)"""
    d = Path(checkpoint_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    with open(d / "model.safetensors", "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(header_len))
    return h.hexdigest()[:16]


def torch_release(version: str) -> str:
    """2.11.0+cu130 -> 2.11.0: a package runs on the torch release that made it."""
    return version.split("+")[0]


def read_metadata(path) -> dict:
    from torch._inductor.package import load_package

    path = Path(path)
    if not path.is_file():
        raise PackageError(f"package {path} does not exist; make one with scripts/export.py")
    try:
        runner = load_package(str(path), "decode")
        meta = json.loads(runner.get_metadata()[METADATA_KEY])
    except Exception as e:  # not a .pt2, made by another torch, or not ours
        raise PackageError(
            f"{path} is not a package scripts/export.py made with this torch ({torch.__version__}): "
            f"{type(e).__name__}; export it again"
        ) from None
    return meta


# Loading a CUDA package crashes the process on the GPU machines we have (torch 2.11.0+cu130, H100
# and H200): a segfault in AOTInductor's package loader, and not ours: on 2026-12-03 a single
# nn.Linear through torch's own aoti_compile_and_package / aoti_load_package segfaulted the same way
# (scripts/diag_cuda_package.py, BENCHMARKS.md). So CUDA packages are refused with a clear error;
# FASTGEN_PACKAGE_CUDA=1 tries anyway (on a torch whose CUDA AOTI loader works).
CUDA_PACKAGES_ENV = "FASTGEN_PACKAGE_CUDA"


def check_cuda_packages_allowed(device: torch.device):
    if device.type == "cuda" and os.environ.get(CUDA_PACKAGES_ENV) != "1":
        raise PackageError(
            "CUDA packages are not supported yet (torch 2.11's CUDA AOTInductor loader segfaults, even for one "
            "nn.Linear); "
            f"use --compile on CUDA, or set {CUDA_PACKAGES_ENV}=1 to try"
        )


def check_package(meta: dict, path, checkpoint_dir, device: torch.device, dtype: torch.dtype):
    """Refuse a package made for another checkpoint, dtype, device or torch release."""
    check_cuda_packages_allowed(device)
    name = Path(path).name
    if meta.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{name} has format {meta.get('format')}, this code reads {PACKAGE_FORMAT}; export it again")
    if meta["torch_version"] != torch_release(torch.__version__):
        raise PackageError(
            f"{name} was made with torch {meta['torch_version']} but this is torch {torch_release(torch.__version__)}; "
            "export it again here"
        )
    ours = checkpoint_identity(checkpoint_dir)
    if meta["checkpoint_id"] != ours:
        raise PackageError(
            f"{name} was made for checkpoint {meta['checkpoint']} (id {meta['checkpoint_id']}) but "
            f"{checkpoint_dir} has id {ours}; export it from this checkpoint"
        )
    if meta["device"] != device.type:
        raise PackageError(f"{name} was made for {meta['device']} but this run is on {device.type}; export it there")
    if meta["dtype"] != str(dtype).removeprefix("torch."):
        raise PackageError(
            f"{name} was made for {meta['dtype']} but this run asks for {str(dtype).removeprefix('torch.')}"
        )


def open_package(path, checkpoint_dir, device: torch.device, dtype: torch.dtype) -> dict:
    """Read the package's metadata and check it against this run; returns the metadata."""
    meta = read_metadata(path)
    check_package(meta, path, checkpoint_dir, device, dtype)
    return meta


class Package:
    """The loaded prefill and decode programs, bound to one model's weights and cache."""

    def __init__(self, path, model, meta: dict):
        from torch._inductor.package import load_package

        self.path, self.meta = Path(path), meta
        self.batch_size, self.max_seq_len, self.prefill_len = (
            meta["batch_size"],
            meta["max_seq_len"],
            meta["prefill_len"],
        )
        t0 = time.perf_counter()
        model.setup_caches(self.batch_size, self.max_seq_len)  # the exported cache shape (checked below)
        cache = model.layers[0].attention.kv_cache.k_cache
        if list(cache.shape) != meta["cache_shape"]:
            raise PackageError(
                f"{self.path.name} has cache shape {meta['cache_shape']}, the model made {list(cache.shape)}"
            )
        constants = constant_names(model)
        self.programs = {}
        for name in PROGRAMS:
            program = load_package(str(self.path), name)
            # user_managed: the program uses these very tensors (no copy), so both programs and
            # the model share weights and cache; they must not be re-allocated while it lives.
            program.load_constants(
                {k: constants[k] for k in program.get_constant_fqns()}, check_full_update=True, user_managed=True
            )
            self.programs[name] = program
        self.load_s = time.perf_counter() - t0

    def step(self, model, tokens, input_pos, sampling):
        """Generator's prefill/decode step signature: tokens [B, T] at slots input_pos [T] -> next [B, 1]."""
        program = self.programs["decode" if tokens.shape[1] == 1 else "prefill"]
        # A compiled program reads its inputs with the strides it was exported with (a prefill chunk
        # tokens[:, i:j] is a strided view)
        next_token, logits = program(tokens.contiguous(), input_pos.contiguous(), model.row_start)
        # greedy over the whole vocab is in the program; sampling filters (and a vocab padded past
        # the tokenizer's) run after it, on the device (no host sync)
        in_program = sampling.temperature == 0 and sampling.vocab_size is None
        return next_token if in_program else sample(logits, sampling)


class PackageGenerator(Generator):
    """A Generator whose prefill and decode steps are the package's programs (no compiler at run
    time). Requests must fit the exported shapes: a batch of fewer prompts is filled up with copies
    of the last one, whose tokens are dropped; the cache is the exported one, never re-allocated
    (the programs hold its address)."""

    def __init__(self, model, package: Package, prefill_chunk_size: int = 2048, cuda_graph: bool = True):
        super().__init__(model, prefill_chunk_size=min(prefill_chunk_size, package.prefill_len))
        self.package = package
        self.prefill_fn = package.step
        # On CUDA the package's decode call (and sampling) replays as one CUDA graph.
        self.decode_fn = advancing(package.step)
        if self.device.type == "cuda" and cuda_graph:
            self.decode_fn = CUDAGraphStep(self.decode_fn)

    @classmethod
    def load(cls, path, meta: dict, model, prefill_chunk_size: int = 2048, cuda_graph: bool | None = None):
        if cuda_graph is None:  # FASTGEN_PACKAGE_CUDA_GRAPH=0: the package's own calls, to measure the graph's gain
            cuda_graph = os.environ.get("FASTGEN_PACKAGE_CUDA_GRAPH", "1") != "0"
        package = Package(path, model, meta)
        print(f"Loaded package {Path(path).name} in {package.load_s:.2f} s", file=sys.stderr)
        return cls(model, package, prefill_chunk_size, cuda_graph)

    def setup(self, batch_size: int, max_seq_len: int, kv_cache_dtype: torch.dtype | None = None):
        p, name = self.package, self.package.path.name
        if batch_size > p.batch_size:
            raise UsageError(
                f"{batch_size} prompts but {name} was exported for a batch of {p.batch_size}; "
                f"export it with --batch-size {batch_size}"
            )
        if max_seq_len > p.max_seq_len:
            raise UsageError(
                f"{max_seq_len} cache slots asked for but {name} was exported with {p.max_seq_len}; "
                f"ask for fewer tokens or export it with --max-seq-len {max_seq_len}"
            )
        dtype = self.model.tok_embeddings.weight.dtype
        if kv_cache_dtype is not None and kv_cache_dtype != dtype:
            raise UsageError(f"{name} has a {p.meta['dtype']} KV cache; a package cannot change its cache dtype")

    def generate(
        self,
        prompts,
        max_new_tokens,
        sampling: Sampling | None = None,
        stop_ids=(),
        on_token=None,
        continue_sequence=False,
        pad_id=0,
    ):
        sampling = sampling or Sampling()
        start_slot, prompts = self._first_slot(prompts, continue_sequence)
        n, size = len(prompts), self.package.batch_size
        self.setup(n, start_slot + max(len(p) for p in prompts) + max_new_tokens)
        filled = list(prompts) + [prompts[-1]] * (size - n)

        def real_rows_only(row, token_id):  # a filler row ends at its first token
            return on_token(row, token_id) if row < n and on_token is not None else row >= n

        rows = RowTokens(size, max_new_tokens, stop_ids, real_rows_only)
        if start_slot:
            # A chat turn: every row is a copy of the one real row, so every row continues alike
            # (Generator allows continuing only a batch of one).
            tokens = torch.tensor(filled, dtype=torch.long, device=self.device)
        else:
            tokens = self._begin(filled, max_new_tokens, start_slot, pad_id)
        return self._run(tokens, start_slot, sampling, rows, real_rows=n)  # a chat keeps its place as Generator's
