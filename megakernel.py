"""One persistent kernel for every layer of a batch-1 decode step: dense float models on a GPU.

A small model's step is bound by its chain of kernels, not its bytes: SmolLM2-135M reads ~0.27 GB a
step (~0.09 ms at copy bandwidth) but runs ~180 kernels of ~2.7 us each, each waiting for the last
(0.486-0.510 ms on an H100/H200 with programmatic dependent launch; issue 11 wants 0.4). Here one
program per SM runs every layer's phases in turn, meeting the others at a grid barrier (an atomic
count of arrivals) between phases instead of ending a kernel:

  0  RMSNorm + wqkv + RoPE, k and v written into the cache at the token's slot, q kept
  1  attention over the valid slots [row start (or the window's first slot), slot], split over programs
     (a kv head's last split to finish merges them, counting finished splits with an atomic)
  2  wo + the residual                    -> h
  3  RMSNorm + w13, SiLU(gate) * up       -> hidden
  4  w2 + the residual                    -> the next layer's input

Each program takes a few rows of each projection (its weights read once, in fp32 accumulation, the
norms folded in as gemv.decode_gemv folds them) or a (kv head, split) of the attention. The layers'
weights and caches are reached through a table of their addresses ([L, 8] int64), so nothing is copied or
stacked. Data other programs wrote is read with ".cg" loads (L2, never a stale L1 line).

The barrier needs every program resident at once: one program an SM, launched alone (not with PDL).
Triton's CPU interpreter runs programs one after another, where a barrier would wait forever: there
the same kernel runs one phase of one layer per launch (PERSISTENT=0), so the phases' arithmetic is
checked without a GPU (scripts/interpret_kernels.py); the barrier is the GPU tests'.

`decode_layers_reference` is the model's own blocks; the tests compare the kernel with it.
Opt-in (FASTGEN_MEGAKERNEL=1) until a GPU has measured it; generate.Generator installs it with
use_layer_kernel.
"""

import os

import torch

from model import FeedForward, KVCache, RMSNorm, Transformer

try:  # Triton ships with CUDA builds of torch; a CPU-only install has none
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = os.environ.get("FASTGEN_MEGAKERNEL", "0") == "1"
# Programs: one an SM by default (FASTGEN_MEGAKERNEL_PROGRAMS to sweep); every one must be resident.
PROGRAMS = int(os.environ.get("FASTGEN_MEGAKERNEL_PROGRAMS", "0"))
MAX_DIM = 2048  # the widest model it takes: a program's rows of a projection stay a few KB
BLOCK_K = 128  # input elements a step of a projection's loop
BLOCK_S = 16  # cache slots a step of the attention's loop (32: 248 registers a thread at 8 warps)
# The attention's loop as two tensor-core dots over 64-slot tiles (the query heads padded to 16 rows, as
# kv_attention's kernel does) instead of broadcast products over 16-slot steps. On an H100 (2026-12-05,
# seventh session) the broadcast loop took 5.7 us over 17 slots and ~2.5 us a 16-slot step at 8000 slots
# (megakernel_phases.py). NOT YET ON A GPU: FASTGEN_MEGAKERNEL_ATTN_DOT=1 turns it on, for timing.
ATTN_DOT = os.environ.get("FASTGEN_MEGAKERNEL_ATTN_DOT", "0") == "1"
ATTN_DOT_SLOTS = 64
MAX_SPLITS = 32  # the attention's splits of the valid slots, at most
MIN_SPLIT_SLOTS = 32  # and at least this many slots each: enough splits to keep the loop short
# Each layer's weights on their way to L2 during the layer before (SmolLM2: 7 MB a layer; not a model whose
# layer would crowd the L2 out: 50 MB on an H100), asked for at the top of each layer. Asking in the attention
# phase instead was tried: SmolLM2 0.629 ms a step against 0.644, and 0.635 without: noise (H100, 2026-12-05;
# BENCHMARKS.md). FASTGEN_MEGAKERNEL_PREFETCH=0 turns it off, for timing.
PREFETCH = os.environ.get("FASTGEN_MEGAKERNEL_PREFETCH", "1") == "1"
PREFETCH_MAX_BYTES = 16 << 20
NUM_WARPS = 8  # SmolLM2 compiles to 228 registers a thread (sm_90, no spills): one program an SM


def eligible(model: Transformer) -> bool:
    """A dense Llama-family model whose every layer the kernel can run: plain float linears without
    biases, no query/key norms, RMSNorms, an unquantized cache in the activations' dtype, power-of-two
    head dims, at most MAX_DIM wide."""
    args = model.args
    if args.n_experts or args.qk_norm or args.qkv_bias or args.dim > MAX_DIM:
        return False
    hd = args.head_dim
    if hd & (hd - 1) or not 16 <= hd <= 256 or args.intermediate_size > 4 * MAX_DIM:
        return False
    dtype = model.tok_embeddings.weight.dtype
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        cache = a.kv_cache
        if (
            type(f) is not FeedForward
            or type(layer.attention_norm) is not RMSNorm
            or type(layer.ffn_norm) is not RMSNorm
        ):
            return False
        if cache is None or not isinstance(cache, KVCache) or type(cache).update is not KVCache.update:
            return False  # a quantized cache, or none yet
        if cache.k_cache.dtype != dtype or cache.k_cache.shape[0] != 1:
            return False
        for linear in (a.wqkv, a.wo, f.w13, f.w2):
            w = linear.weight
            if not isinstance(linear, torch.nn.Linear) or linear.bias is not None or w.dtype != dtype:
                return False
            if not w.is_contiguous() or linear._forward_hooks or linear._forward_pre_hooks:
                return False
    return True


def addresses(model: Transformer) -> list[list[int]]:
    """Each layer's addresses, the kernel's table: wqkv, wo, w13, w2, the two norm weights, the k and v caches."""
    rows = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        tensors = (a.wqkv.weight, a.wo.weight, f.w13.weight, f.w2.weight)
        tensors += (layer.attention_norm.weight, layer.ffn_norm.weight, a.kv_cache.k_cache, a.kv_cache.v_cache)
        rows.append([t.data_ptr() for t in tensors])
    return rows


def layer_bytes(model: Transformer) -> int:
    layer = model.layers[0]
    a, f = layer.attention, layer.feed_forward
    return sum(m.weight.numel() * m.weight.element_size() for m in (a.wqkv, a.wo, f.w13, f.w2))


def rows_per_program(n: int, programs: int, cap: int = 32) -> int:
    """A power of two near n / programs (at least 1, at most cap): one round of blocks where it fits."""
    return min(cap, triton.next_power_of_2(-(-n // programs)))


def decode_layers_reference(model: Transformer, x, cos, sin, attend, input_pos) -> torch.Tensor:
    """What the kernel computes: the model's own layers, one after another."""
    return Transformer.run_layers(model, x, cos, sin, attend, input_pos)


def launch_constants(args, programs: int, element_size: int, attn_dot: bool) -> dict:
    """_layers_kernel's constexprs and warps for a model's shape (all but PERSISTENT, TIMED and PREFETCH)."""
    D, HQ, HKV, HD, inter = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size
    g_pad = triton.next_power_of_2(HQ // HKV)
    lines = dict(LINES_D=D, LINES_A=HQ * HD, LINES_I=inter)  # input lengths of the projections
    return dict(
        D=D,
        HQ=HQ,
        HKV=HKV,
        HD=HD,
        INTER=inter,
        G_PAD=g_pad,
        G_ROWS=max(16, g_pad) if attn_dot else g_pad,
        ATTN_DOT=attn_dot,
        QK_SCALE=HD**-0.5 * 1.4426950408889634,
        EPS=args.norm_eps,
        BLOCK_K=BLOCK_K,
        BLOCK_S=ATTN_DOT_SLOTS if attn_dot else BLOCK_S,
        MAX_SPLITS=MAX_SPLITS,
        MIN_SPLIT_SLOTS=MIN_SPLIT_SLOTS,
        num_warps=NUM_WARPS,
        **{name: triton.next_power_of_2(-(-k * element_size // 128)) for name, k in lines.items()},
        QKV_PAIRS=rows_per_program((HQ + 2 * HKV) * HD // 2, programs),
        WO_ROWS=rows_per_program(D, programs),
        W13_ROWS=rows_per_program(inter, programs, cap=16),  # gate and up rows: twice the registers
        W2_ROWS=rows_per_program(D, programs),
    )


def decode_layers(
    model: Transformer, table, x, cos, sin, input_pos, programs: int, persistent: bool = True, times=None
):
    """x [1, 1, D] (the embedded token), cos/sin [.., HD] at its position, input_pos [1] (its slot)
    -> [1, 1, D], every layer applied; writes each layer's k and v into its cache at the slot.
    persistent=False launches each phase of each layer on its own (Triton's interpreter). times: an int64
    [programs, L, 5, 2] tensor to take each phase's end and barrier exit (megakernel_phases.py), or None."""
    args = model.args
    D, HQ, HD, inter = args.dim, args.n_heads, args.head_dim, args.intermediate_size
    dtype, device = x.dtype, x.device
    S = model.cache_len
    x_in = x.reshape(D)
    out = torch.empty(D, dtype=dtype, device=device)
    h = torch.empty(D, dtype=dtype, device=device)
    q = torch.empty(HQ * HD, dtype=dtype, device=device)
    attn = torch.empty(HQ * HD, dtype=dtype, device=device)
    parts = torch.empty(HQ * MAX_SPLITS * (HD + 2), dtype=torch.float32, device=device)
    hidden = torch.empty(inter, dtype=dtype, device=device)
    launch = launch_constants(args, programs, x.element_size(), ATTN_DOT)
    launch["PREFETCH"] = persistent and PREFETCH and layer_bytes(model) <= PREFETCH_MAX_BYTES
    common = (x_in, out, h, q, attn, parts, hidden, table, cos.reshape(-1), sin.reshape(-1), input_pos.reshape(1))
    common += (model.row_start, model.layer_kernel_counts, times, S, args.sliding_window or 0)
    n_layers = len(model.layers)
    if persistent:
        _layers_kernel[(programs,)](*common, 0, n_layers, 0, PERSISTENT=True, TIMED=times is not None, **launch)
    else:
        for layer in range(n_layers):
            for phase in range(5):
                _layers_kernel[(programs,)](*common, layer, 1, phase, PERSISTENT=False, TIMED=False, **launch)
    return out.view(1, 1, D)


# eager even inside torch.compile (a graph break, as gemv's PDL blocks): the launch reads addresses
_decode_layers_eager = torch.compiler.disable(decode_layers)


class LayerKernelTransformer(Transformer):
    """A Transformer whose batch-1 decode step (one token, on a GPU) runs its layers as one kernel;
    every other call is Transformer's. Set by use_layer_kernel, which also builds the address table."""

    def run_layers(self, x, cos, sin, attend, input_pos):
        if x.shape[0] * x.shape[1] == 1 and input_pos.dim() == 1 and x.is_cuda:
            return _decode_layers_eager(
                self, self.layer_kernel_table, x, cos, sin, input_pos, self.layer_kernel_programs
            )
        return super().run_layers(x, cos, sin, attend, input_pos)


def use_layer_kernel(model: Transformer) -> bool:
    """Run the model's batch-1 decode layers as one kernel if it is eligible and on a GPU (again after
    every setup_caches: the table holds the caches' addresses). Returns whether it does."""
    if triton is None or not model.tok_embeddings.weight.is_cuda or not eligible(model):
        if type(model) is LayerKernelTransformer:
            model.__class__ = Transformer
        return False
    device = model.tok_embeddings.weight.device
    table = addresses(model)
    # the same caches (setup again with the same sizes): keep the tensors a recorded CUDA graph reads
    if type(model) is not LayerKernelTransformer or model.layer_kernel_table.tolist() != table:
        model.layer_kernel_table = torch.tensor(table, dtype=torch.int64, device=device)  # [L, 8]
        # the barrier's arrivals, then each kv head's finished attention splits (megakernel._layers_kernel)
        model.layer_kernel_counts = torch.zeros(1 + model.args.n_kv_heads, dtype=torch.int64, device=device)
    model.layer_kernel_programs = PROGRAMS or torch.cuda.get_device_properties(device).multi_processor_count
    model.__class__ = LayerKernelTransformer
    return True


if triton is not None:
    from kv_attention import prefetch_l2  # the PTX prefetch (L2), as gemv's kernels use it under PDL

    @triton.jit
    def _grid_sync(arrivals_ptr, n_programs, target):
        # Every program adds one arrival and waits until all have: the count only ever grows (int64: never
        # wraps), each barrier's target n_programs above the last, so no program resets anything. Release on
        # arriving, acquire while waiting (GPU scope): what each program stored before it arrived is visible
        # to every program after the barrier.
        tl.debug_barrier()  # every warp of this program has stored its part
        tl.atomic_add(arrivals_ptr, 1, sem="release", scope="gpu")
        target += n_programs
        while tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu") < target:  # compiles to ld.acquire
            pass
        tl.debug_barrier()
        return target

    @triton.jit
    def _phase_done(
        counts_ptr, programs, target, times_ptr, pid, layer, n_layers, PHASE: tl.constexpr, TIMED: tl.constexpr
    ):
        # the barrier after a phase; TIMED: the GPU's clock (ns) when this program finished the phase and when it
        # left the barrier, at times[pid, layer, PHASE] (scripts/megakernel_phases.py reads them)
        if TIMED:
            tl.store(times_ptr + ((pid * n_layers + layer) * 5 + PHASE) * 2, tl.extra.cuda.globaltimer())
        target = _grid_sync(counts_ptr, programs, target)
        if TIMED:
            tl.store(times_ptr + ((pid * n_layers + layer) * 5 + PHASE) * 2 + 1, tl.extra.cuda.globaltimer())
        return target

    @triton.jit
    def _inv_rms(v_ptr, K: tl.constexpr, EPS: tl.constexpr, BLOCK_K: tl.constexpr):
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: every load in flight at once (see _rows_dot)
            k = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(v_ptr + k, mask=k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
            squares += v * v
        return tl.rsqrt(tl.sum(squares, axis=0) / K + EPS)

    @triton.jit
    def _rows_dot(
        w_ptr, rows, other_rows, row_ok, v_ptr, g_ptr, K: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # fp32 [R] twice: weight rows `rows` and `other_rows` (RoPE's pairs, gate and up; None: one set, the
        # second result 0) of w [N, K] times v (times the norm weight g, where g_ptr is given). The loop is
        # unrolled so that all of a program's loads are issued before the first one is used: a program reads
        # only a few KB a phase, so its time is the round trips, one instead of K / BLOCK_K (rolled, with
        # each set in a loop of its own: SmolLM2 0.691 ms a step in this kernel on an H100, 2026-12-05)
        acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
        acc_other = tl.zeros((R, BLOCK_K), dtype=tl.float32)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        for k0 in tl.static_range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            v = tl.load(v_ptr + k, mask=k_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            if g_ptr is not None:
                v = v * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            w_ok = row_ok[:, None] & k_ok[None, :]
            w = tl.load(w_rows + k[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * v[None, :]
            if other_rows is not None:
                w_other = w_ptr + other_rows.to(tl.int64)[:, None] * K + k[None, :]
                acc_other += (
                    tl.load(w_other, mask=w_ok, other=0.0, eviction_policy="evict_first").to(tl.float32) * v[None, :]
                )
        return tl.sum(acc, axis=1), tl.sum(acc_other, axis=1)

    @triton.jit
    def _residual_projection(
        w_ptr,
        v_ptr,
        res_ptr,
        out_ptr,
        pid,
        programs,
        N: tl.constexpr,
        K: tl.constexpr,
        R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # out = res + w [N, K] @ v, R output rows a block, the blocks dealt round the programs (wo, w2)
        for block in range(pid, tl.cdiv(N, R), programs):
            rows = block * R + tl.arange(0, R)
            ok = rows < N
            y, _ = _rows_dot(w_ptr, rows, None, ok, v_ptr, None, K, R, BLOCK_K)
            y += tl.load(res_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _prefetch_rows(w_ptr, rows, row_ok, K: tl.constexpr, LINES: tl.constexpr):
        # each 128-byte line of weight rows `rows` of w [N, K] asked of L2 (LINES: a power of two >= the lines a row)
        LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements a line
        at = tl.minimum(tl.arange(0, LINES) * LINE, K - 1)  # clamped: no address past the row
        rows = tl.where(row_ok, rows, 0)
        prefetch_l2(w_ptr + rows.to(tl.int64)[:, None] * K + at[None, :])

    @triton.jit
    def _prefetch_layer(
        table_ptr,
        layer,
        pid,
        programs,
        dtype: tl.constexpr,
        D: tl.constexpr,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        HD: tl.constexpr,
        INTER: tl.constexpr,
        QKV_PAIRS: tl.constexpr,
        WO_ROWS: tl.constexpr,
        W13_ROWS: tl.constexpr,
        W2_ROWS: tl.constexpr,
        LINES_D: tl.constexpr,
        LINES_A: tl.constexpr,
        LINES_I: tl.constexpr,
    ):
        # this program's rows of every projection of `layer` (the rows its phases will read) on their way to L2
        row = table_ptr + layer * 8
        wqkv = tl.load(row + 0).to(tl.pointer_type(dtype))
        wo = tl.load(row + 1).to(tl.pointer_type(dtype))
        w13 = tl.load(row + 2).to(tl.pointer_type(dtype))
        w2 = tl.load(row + 3).to(tl.pointer_type(dtype))
        half: tl.constexpr = HD // 2
        n_pairs: tl.constexpr = (HQ + 2 * HKV) * half
        for block in range(pid, tl.cdiv(n_pairs, QKV_PAIRS), programs):
            pairs = block * QKV_PAIRS + tl.arange(0, QKV_PAIRS)
            lo_rows = pairs // half * HD + pairs % half
            _prefetch_rows(wqkv, lo_rows, pairs < n_pairs, D, LINES_D)
            _prefetch_rows(wqkv, lo_rows + half, pairs < n_pairs, D, LINES_D)
        for block in range(pid, tl.cdiv(D, WO_ROWS), programs):
            rows = block * WO_ROWS + tl.arange(0, WO_ROWS)
            _prefetch_rows(wo, rows, rows < D, HQ * HD, LINES_A)
        for block in range(pid, tl.cdiv(INTER, W13_ROWS), programs):
            rows = block * W13_ROWS + tl.arange(0, W13_ROWS)
            _prefetch_rows(w13, rows, rows < INTER, D, LINES_D)
            _prefetch_rows(w13, rows + INTER, rows < INTER, D, LINES_D)
        for block in range(pid, tl.cdiv(D, W2_ROWS), programs):
            rows = block * W2_ROWS + tl.arange(0, W2_ROWS)
            _prefetch_rows(w2, rows, rows < D, INTER, LINES_I)

    @triton.jit
    def _layers_kernel(
        x_in_ptr,  # [D]: the first layer's input, the embedded token
        x_ptr,  # [D]: each layer's output (the last one's is the result)
        h_ptr,  # [D]: a layer's stream after its attention
        q_ptr,  # [HQ * HD]: the token's queries, rotated
        attn_ptr,  # [HQ * HD]: the attention's output, wo's input
        parts_ptr,  # [HQ, MAX_SPLITS, HD + 2] fp32: each split's unnormalised output, its max and its sum
        hidden_ptr,  # [INTER]: SiLU(gate) * up
        table_ptr,  # [L, 8] int64: each layer's addresses (megakernel.addresses)
        cos_ptr,  # [HD]: the token's RoPE angles
        sin_ptr,
        slot_ptr,  # [1]: the token's cache slot
        row_start_ptr,  # [1]: the row's first valid slot
        counts_ptr,  # [1 + HKV] int64: the barrier's arrivals (ever growing), each kv head's finished splits
        times_ptr,  # TIMED: [programs, L, 5, 2] int64 (see _phase_done); else None
        S,  # cache slots
        WINDOW,  # sliding window (0: none)
        first_layer,
        n_layers,
        phase,  # PERSISTENT=False: the one phase to run
        PERSISTENT: tl.constexpr,
        TIMED: tl.constexpr,
        D: tl.constexpr,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        HD: tl.constexpr,
        INTER: tl.constexpr,
        G_PAD: tl.constexpr,
        G_ROWS: tl.constexpr,  # the attention loop's query rows: G_PAD, or >= 16 for ATTN_DOT (tl.dot's smallest M)
        ATTN_DOT: tl.constexpr,
        QK_SCALE: tl.constexpr,  # HD ** -0.5 * log2(e): the softmax in base 2
        EPS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
        MAX_SPLITS: tl.constexpr,
        MIN_SPLIT_SLOTS: tl.constexpr,
        QKV_PAIRS: tl.constexpr,
        WO_ROWS: tl.constexpr,
        W13_ROWS: tl.constexpr,
        W2_ROWS: tl.constexpr,
        PREFETCH: tl.constexpr,  # each layer's weights asked of L2 during the layer before it (GPU only: PTX)
        LINES_D: tl.constexpr,  # with PREFETCH: powers of two >= the 128-byte lines of a row of D, of HQ * HD,
        LINES_A: tl.constexpr,  # and of INTER elements
        LINES_I: tl.constexpr,
    ):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        dtype = x_ptr.dtype.element_ty
        half: tl.constexpr = HD // 2
        G: tl.constexpr = HQ // HKV
        target = tl.zeros((), dtype=tl.int64)  # the arrivals the next barrier waits for, less n_programs
        if PERSISTENT:  # every call adds a multiple of n_programs: rounded down, those before this call
            arrived = tl.load(counts_ptr, volatile=True)  # (some of this call's may be in already)
            target = arrived - arrived % programs
        # the valid slots, the same in every layer: [start, slot], cut into n_splits chunks of `chunk`
        slot = tl.load(slot_ptr).to(tl.int32)
        start = tl.load(row_start_ptr).to(tl.int32)
        if WINDOW > 0:
            start = tl.maximum(start, slot - WINDOW + 1)
        n_valid = slot - start + 1
        n_splits = tl.minimum(tl.minimum(MAX_SPLITS, tl.maximum(programs // HKV, 1)), tl.cdiv(n_valid, MIN_SPLIT_SLOTS))
        chunk = tl.cdiv(tl.cdiv(n_valid, n_splits), BLOCK_S) * BLOCK_S
        dims = tl.arange(0, HD)
        last_layer = first_layer + n_layers - 1
        for layer in range(first_layer, first_layer + n_layers):
            if PREFETCH and layer < last_layer:  # the next layer's weights read from DRAM while this one runs
                # (the first layer's are not: one layer of many)
                _prefetch_layer(table_ptr, layer + 1, pid, programs, dtype, D, HQ, HKV, HD, INTER, QKV_PAIRS, WO_ROWS,
                               W13_ROWS, W2_ROWS, LINES_D, LINES_A, LINES_I)  # fmt: skip
            row = table_ptr + layer * 8
            wqkv = tl.load(row + 0).to(tl.pointer_type(dtype))
            wo = tl.load(row + 1).to(tl.pointer_type(dtype))
            w13 = tl.load(row + 2).to(tl.pointer_type(dtype))
            w2 = tl.load(row + 3).to(tl.pointer_type(dtype))
            attention_norm = tl.load(row + 4).to(tl.pointer_type(dtype))
            ffn_norm = tl.load(row + 5).to(tl.pointer_type(dtype))
            k_cache = tl.load(row + 6).to(tl.pointer_type(dtype))
            v_cache = tl.load(row + 7).to(tl.pointer_type(dtype))
            x_src = x_ptr
            if layer == 0:
                x_src = x_in_ptr

            # 0: RMSNorm + wqkv; RoPE on q and k (rotate_half pairs dim i with i + HD/2: a program takes
            # both rows of its pairs); k and v into the cache at the slot, q kept for the attention
            if PERSISTENT or phase == 0:
                inv_rms = _inv_rms(x_src, D, EPS, BLOCK_K)
                n_pairs = (HQ + 2 * HKV) * half
                for block in range(pid, tl.cdiv(n_pairs, QKV_PAIRS), programs):
                    pairs = block * QKV_PAIRS + tl.arange(0, QKV_PAIRS)
                    ok = pairs < n_pairs
                    head, i = pairs // half, pairs % half
                    lo_rows = head * HD + i
                    y1, y2 = _rows_dot(wqkv, lo_rows, lo_rows + half, ok, x_src, attention_norm, D, QKV_PAIRS, BLOCK_K)
                    y1 *= inv_rms
                    y2 *= inv_rms
                    y1 = y1.to(dtype).to(tl.float32)  # wqkv's output, in the activations' dtype as the model has it
                    y2 = y2.to(dtype).to(tl.float32)
                    c = tl.load(cos_ptr + i, mask=ok, other=0.0).to(tl.float32)
                    s = tl.load(sin_ptr + i, mask=ok, other=0.0).to(tl.float32)
                    rotated = head < HQ + HKV  # q and k heads; v is not rotated
                    o1 = tl.where(rotated, y1 * c - y2 * s, y1)
                    o2 = tl.where(rotated, y2 * c + y1 * s, y2)
                    is_q = ok & (head < HQ)
                    tl.store(q_ptr + lo_rows, o1.to(dtype), mask=is_q)
                    tl.store(q_ptr + lo_rows + half, o2.to(dtype), mask=is_q)
                    kv_head = tl.where(head < HQ + HKV, head - HQ, head - HQ - HKV)
                    at = (kv_head * S + slot).to(tl.int64) * HD + i
                    is_k = ok & (head >= HQ) & (head < HQ + HKV)
                    is_v = ok & (head >= HQ + HKV)
                    tl.store(k_cache + at, o1.to(dtype), mask=is_k)
                    tl.store(k_cache + at + half, o2.to(dtype), mask=is_k)
                    tl.store(v_cache + at, o1.to(dtype), mask=is_v)
                    tl.store(v_cache + at + half, o2.to(dtype), mask=is_v)
            if PERSISTENT:
                target = _phase_done(counts_ptr, programs, target, times_ptr, pid, layer, n_layers, 0, TIMED)

            # 1: attention, a (kv head, split) a unit: its G query heads over the split's slots, online softmax
            if PERSISTENT or phase == 1:
                g = tl.arange(0, G_ROWS)
                g_ok = g < G
                for unit in range(pid, HKV * n_splits, programs):
                    kv_head = unit // n_splits
                    split = unit % n_splits
                    lo = start + split * chunk
                    hi = tl.minimum(lo + chunk, slot + 1)
                    heads = kv_head * G + g
                    q_at = heads[:, None] * HD + dims[None, :]
                    q_raw = tl.load(q_ptr + q_at, mask=g_ok[:, None], other=0.0, cache_modifier=".cg")
                    qh = q_raw.to(tl.float32) * QK_SCALE
                    m = tl.full((G_ROWS,), float("-inf"), dtype=tl.float32)
                    l_sum = tl.zeros((G_ROWS,), dtype=tl.float32)
                    acc = tl.zeros((G_ROWS, HD), dtype=tl.float32)
                    cache_rows = kv_head.to(tl.int64) * S
                    for s0 in range(lo, hi, BLOCK_S):
                        slots = s0 + tl.arange(0, BLOCK_S)
                        s_ok = slots < hi
                        kv_at = (cache_rows + slots)[:, None] * HD + dims[None, :]
                        k = tl.load(k_cache + kv_at, mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
                        v = tl.load(v_cache + kv_at, mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
                        if ATTN_DOT:  # [G_ROWS, BLOCK_S]
                            scores = tl.dot(q_raw, tl.trans(k), input_precision="ieee") * QK_SCALE
                        else:
                            scores = tl.sum(qh[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
                        scores = tl.where(s_ok[None, :], scores, float("-inf"))
                        m_new = tl.maximum(m, tl.max(scores, axis=1))
                        p = tl.exp2(scores - m_new[:, None])
                        alpha = tl.exp2(m - m_new)
                        l_sum = l_sum * alpha + tl.sum(p, axis=1)
                        if ATTN_DOT:
                            pv = tl.dot(p.to(dtype), v, input_precision="ieee")
                        else:
                            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
                        acc = acc * alpha[:, None] + pv
                        m = m_new
                    if n_splits == 1:
                        tl.store(attn_ptr + q_at, (acc / l_sum[:, None]).to(dtype), mask=g_ok[:, None])
                    else:
                        part = parts_ptr + (heads * MAX_SPLITS + split) * (HD + 2)
                        tl.store(part[:, None] + dims[None, :], acc, mask=g_ok[:, None])
                        tl.store(part + HD, m, mask=g_ok)
                        tl.store(part + HD + 1, l_sum, mask=g_ok)
                        # the kv head's split that finishes last merges them all: no barrier and phase of its own
                        tl.debug_barrier()  # this program's partials all stored
                        done = tl.atomic_add(counts_ptr + 1 + kv_head, 1, sem="acq_rel", scope="gpu")
                        if done == n_splits - 1:
                            tl.atomic_xchg(
                                counts_ptr + 1 + kv_head, 0, sem="relaxed", scope="gpu"
                            )  # for the next layer
                            gm = tl.arange(0, G_PAD)  # the merge's query heads: no dot, no rows past G_PAD
                            gm_ok = gm < G
                            heads_m = kv_head * G + gm
                            splits = tl.arange(0, MAX_SPLITS)
                            both_ok = gm_ok[:, None] & (splits < n_splits)[None, :]  # [G_PAD, MAX_SPLITS]
                            parts_at = parts_ptr + (heads_m[:, None] * MAX_SPLITS + splits[None, :]) * (HD + 2)
                            m_all = tl.load(parts_at + HD, mask=both_ok, other=float("-inf"), cache_modifier=".cg")
                            l_all = tl.load(parts_at + HD + 1, mask=both_ok, other=0.0, cache_modifier=".cg")
                            o_all = tl.load(
                                parts_at[:, :, None] + dims[None, None, :],
                                mask=both_ok[:, :, None],
                                other=0.0,
                                cache_modifier=".cg",
                            )
                            # an empty split (m = -inf) weighs 0; a padded head (all -inf) gets 0 / 1, never stored
                            m_max = tl.where(gm_ok, tl.max(m_all, axis=1), 0.0)
                            weight = tl.where(both_ok, tl.exp2(m_all - m_max[:, None]), 0.0)
                            total = tl.where(gm_ok, tl.sum(weight * l_all, axis=1), 1.0)
                            y = tl.sum(weight[:, :, None] * o_all, axis=1) / total[:, None]
                            tl.store(attn_ptr + heads_m[:, None] * HD + dims[None, :], y.to(dtype), mask=gm_ok[:, None])
            if PERSISTENT:
                target = _phase_done(counts_ptr, programs, target, times_ptr, pid, layer, n_layers, 1, TIMED)

            # 2: wo + the residual -> h
            if PERSISTENT or phase == 2:
                _residual_projection(wo, attn_ptr, x_src, h_ptr, pid, programs, D, HQ * HD, WO_ROWS, BLOCK_K)
            if PERSISTENT:
                target = _phase_done(counts_ptr, programs, target, times_ptr, pid, layer, n_layers, 2, TIMED)

            # 3: RMSNorm + w13 (gate rows, then up rows), SiLU(gate) * up -> hidden
            if PERSISTENT or phase == 3:
                inv_rms = _inv_rms(h_ptr, D, EPS, BLOCK_K)
                for block in range(pid, tl.cdiv(INTER, W13_ROWS), programs):
                    rows = block * W13_ROWS + tl.arange(0, W13_ROWS)
                    ok = rows < INTER
                    gate, up = _rows_dot(w13, rows, rows + INTER, ok, h_ptr, ffn_norm, D, W13_ROWS, BLOCK_K)
                    gate *= inv_rms
                    up *= inv_rms
                    gate = gate.to(dtype).to(tl.float32)  # w13's output, in the activations' dtype
                    up = up.to(dtype).to(tl.float32)
                    tl.store(hidden_ptr + rows, (gate * tl.sigmoid(gate) * up).to(dtype), mask=ok)
            if PERSISTENT:
                target = _phase_done(counts_ptr, programs, target, times_ptr, pid, layer, n_layers, 3, TIMED)

            # 4: w2 + the residual -> the layer's output
            if PERSISTENT or phase == 4:
                _residual_projection(w2, hidden_ptr, h_ptr, x_ptr, pid, programs, D, INTER, W2_ROWS, BLOCK_K)
            if PERSISTENT and layer < last_layer:
                target = _phase_done(counts_ptr, programs, target, times_ptr, pid, layer, n_layers, 4, TIMED)
