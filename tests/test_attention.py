"""The offset-plus-length BlockMask and flex attention over the static cache, against SDPA
over each row's sliced valid range (the reference: SDPA on exactly the valid slots)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from model import BLOCK_SIZE, offset_length_block_mask, offset_length_dense_mask, sdpa_attention_over_cache

compiled_flex = torch.compile(flex_attention, dynamic=False)


class FilledCache:
    """What the attention functions read from a cache (KVCache.read()): these K, V."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def read(self):
        return self.k, self.v


def valid_pairs(start, q_start, q_len, kv_len, window):
    """Dense [B, q_len, kv_len] truth table of the contract."""
    q = q_start + torch.arange(q_len).view(1, -1, 1)
    kv = torch.arange(kv_len).view(1, 1, -1)
    ok = (kv >= start.view(-1, 1, 1)) & (kv <= q)
    if window is not None:
        ok &= kv > q - window
    return ok


def visited_blocks(block_mask):
    """[B, q_blocks, kv_blocks] -> 0 skipped, 1 partial (mask_mod applied), 2 full."""
    B, _, n_q, _ = block_mask.kv_indices.shape
    n_kv = block_mask.seq_lengths[1] // BLOCK_SIZE
    out = torch.zeros(B, n_q, n_kv, dtype=torch.int64)
    for kind, num, idx in (
        (1, block_mask.kv_num_blocks, block_mask.kv_indices),
        (2, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        for b in range(B):
            for m in range(n_q):
                chosen = idx[b, 0, m, : num[b, 0, m]].tolist()
                assert len(set(chosen)) == len(chosen)
                assert (out[b, m, chosen] == 0).all(), "a block listed as both partial and full"
                out[b, m, chosen] = kind
    return out


CASES = [
    # (batch starts, q_start, q_len, kv_len, window)
    ([0], 0, 1, 256, None),
    ([0, 5, 130], 200, 1, 512, None),  # decode, rows with different left padding
    ([3, 0], 0, 300, 384, None),  # prefill spanning three q blocks
    ([0, 77], 129, 200, 512, None),  # a chunk that starts mid-block (chat turn)
    ([0, 40], 300, 1, 512, 100),  # sliding window at decode
    ([10, 0, 250], 50, 260, 512, 64),  # sliding window, prefill
    ([0], 1023, 1, 1024, None),  # the last slot
]


@pytest.mark.parametrize("starts,q_start,q_len,kv_len,window", CASES)
def test_block_mask_covers_exactly_the_valid_blocks(starts, q_start, q_len, kv_len, window):
    start = torch.tensor(starts, dtype=torch.int32)
    bm = offset_length_block_mask(start, torch.tensor(q_start), q_len, kv_len, window)
    truth = valid_pairs(start, q_start, q_len, kv_len, window)
    n_q = (q_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    pad = n_q * BLOCK_SIZE - q_len
    truth_padded = F.pad(truth, (0, 0, 0, pad))  # padded query rows are all invalid
    per_block = truth_padded.view(len(starts), n_q, BLOCK_SIZE, kv_len // BLOCK_SIZE, BLOCK_SIZE)
    any_valid = per_block.any(4).any(2)
    real_rows = (torch.arange(n_q * BLOCK_SIZE) < q_len).view(1, n_q, BLOCK_SIZE, 1, 1)
    all_valid = (per_block | ~real_rows).all(4).all(2)
    visited = visited_blocks(bm)
    # every block with a valid pair is visited; a block with none is skipped (work ~ valid length)
    assert torch.equal(visited > 0, any_valid)
    # "full" blocks skip the mask_mod, so they must be wholly valid
    assert not ((visited == 2) & ~all_valid).any()
    # the mask_mod itself agrees with the truth table
    b, q, kv = torch.meshgrid(torch.arange(len(starts)), torch.arange(q_len), torch.arange(kv_len), indexing="ij")
    assert torch.equal(bm.mask_mod(b, torch.zeros_like(b), q, kv), truth)


def sdpa_reference(q, k, v, start, q_start, window):
    """SDPA over each row's sliced valid range: row b, query i attends to slots
    [max(start[b], q_slot - window + 1), q_slot]."""
    B, Hq, T, D = q.shape
    rep = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            q_slot = q_start + i
            lo = int(start[b])
            if window is not None:
                lo = max(lo, q_slot - window + 1)
            if lo > q_slot:
                continue  # a left-pad query: nothing valid to attend to (flex returns 0)
            kk = k[b, :, lo : q_slot + 1].repeat_interleave(rep, dim=0)
            vv = v[b, :, lo : q_slot + 1].repeat_interleave(rep, dim=0)
            out[b, :, i] = F.scaled_dot_product_attention(q[b, :, i : i + 1], kk, vv).squeeze(1)
    return out


@pytest.mark.parametrize("starts,q_start,q_len,kv_len,window", CASES)
def test_dense_mask_is_the_contract(starts, q_start, q_len, kv_len, window):
    start = torch.tensor(starts, dtype=torch.int32)
    dense = offset_length_dense_mask(start, torch.tensor(q_start), q_len, kv_len, window)[:, 0]
    truth = valid_pairs(start, q_start, q_len, kv_len, window)
    real = truth.any(-1)  # a left-pad query (no valid slot) is let see everything instead of NaN
    assert torch.equal(dense[real], truth[real])
    assert dense[~real].all()


@pytest.mark.parametrize("starts,q_start,q_len,kv_len,window", [CASES[1], CASES[3], CASES[5]])
def test_eager_sdpa_over_static_cache_equals_sliced_sdpa(starts, q_start, q_len, kv_len, window):
    """The eager path (no compiler): GQA heads folded into the query axis, dense mask."""
    torch.manual_seed(q_start + q_len)
    B, Hq, Hkv, D = len(starts), 8, 2, 32  # GQA 4:1
    q = torch.randn(B, Hq, q_len, D)
    k = torch.randn(B, Hkv, kv_len, D) * 3
    v = torch.randn(B, Hkv, kv_len, D)
    start = torch.tensor(starts, dtype=torch.int32)
    mask = offset_length_dense_mask(start, torch.tensor(q_start), q_len, kv_len, window)
    out = sdpa_attention_over_cache(q, FilledCache(k, v), mask.repeat(1, 1, Hq // Hkv, 1))
    ref = sdpa_reference(q, k, v, start, q_start, window)
    real = valid_pairs(start, q_start, q_len, kv_len, window).any(-1)  # [B, T]; pad queries aside
    err = (out - ref).transpose(1, 2)[real].norm() / ref.transpose(1, 2)[real].norm()
    assert err < 1e-5, err


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("starts,q_start,q_len,kv_len,window", [CASES[1], CASES[3], CASES[5]])
def test_flex_over_static_cache_equals_sliced_sdpa(starts, q_start, q_len, kv_len, window, compiled):
    torch.manual_seed(q_start + q_len)
    B, Hq, Hkv, D = len(starts), 8, 2, 32  # GQA 4:1
    q = torch.randn(B, Hq, q_len, D)
    # Garbage in never-written / out-of-range slots must not leak into the result.
    k = torch.randn(B, Hkv, kv_len, D) * 3
    v = torch.randn(B, Hkv, kv_len, D)
    start = torch.tensor(starts, dtype=torch.int32)
    bm = offset_length_block_mask(start, torch.tensor(q_start), q_len, kv_len, window)
    fn = compiled_flex if compiled else flex_attention
    out = fn(q, k, v, block_mask=bm, enable_gqa=True)
    ref = sdpa_reference(q, k, v, start, q_start, window)
    err = (out - ref).norm() / ref.norm()
    assert err < 1e-5, err


def test_unwritten_slots_never_attended():
    """Huge garbage in every slot outside the valid range must not move the output.
    (Not NaN: inside a partially valid block a masked V is multiplied by probability 0,
    and 0 * NaN is NaN in any attention kernel; the cache is zero-initialised.)"""
    B, H, D, kv_len = 2, 4, 16, 384
    start = torch.tensor([2, 140], dtype=torch.int32)
    q_start = 200
    k = torch.full((B, H, kv_len, D), 1e4)
    v = torch.full((B, H, kv_len, D), -1e4)
    for b in range(B):
        k[b, :, int(start[b]) : q_start + 1] = torch.randn(H, q_start + 1 - int(start[b]), D)
        v[b, :, int(start[b]) : q_start + 1] = torch.randn(H, q_start + 1 - int(start[b]), D)
    q = torch.randn(B, H, 1, D)
    bm = offset_length_block_mask(start, torch.tensor(q_start), 1, kv_len)
    out = compiled_flex(q, k, v, block_mask=bm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sdpa_reference(q, k, v, start, q_start, None), rtol=1e-5, atol=1e-5)


def test_split_kv_splits(monkeypatch):
    """kv_attention.num_splits: enough (row, kv head, split) programs to fill a GPU, at least a tile a
    split; one split (no merge kernel) for a cache of one tile, for a batch that fills the GPU alone, and
    with SINGLE_SPLIT_MAX_TILES for a cache of at most that many tiles."""
    import kv_attention

    if "FASTGEN_SINGLE_SPLIT_TILES" not in os.environ:  # the default: SmolLM2's 216-slot cache in 4 splits, a tile each
        assert kv_attention.SINGLE_SPLIT_MAX_TILES == 1
        assert kv_attention.num_splits(1, 3, 216, 256) == 4 and kv_attention.num_splits(1, 3, 64, 256) == 1
    monkeypatch.setattr(kv_attention, "SINGLE_SPLIT_MAX_TILES", 0)  # off (FASTGEN_SINGLE_SPLIT_TILES=0)
    assert kv_attention.num_splits(1, 8, 8448, 256) == 32  # 256 programs, Llama-3-8B's 8 kv heads
    assert kv_attention.num_splits(1, 3, 32768, 256) == 64  # MAX_SPLITS
    assert kv_attention.num_splits(1, 3, 216, 256) == 4  # a tile a split at most
    assert kv_attention.num_splits(2, 8, 50, 256) == 1  # one tile
    assert kv_attention.num_splits(32, 8, 8448, 256) == 1  # B32 fills 256 programs alone
    assert kv_attention.num_splits(32, 8, 8448, 512) == 2
    monkeypatch.setattr(kv_attention, "SINGLE_SPLIT_MAX_TILES", 4)  # FASTGEN_SINGLE_SPLIT_TILES=4 (the default 1)
    assert kv_attention.num_splits(1, 3, 216, 256) == 1
    assert kv_attention.num_splits(1, 3, 320, 256) == 5  # 5 tiles: split as before


def test_an_e4m3_values_bf16_is_the_top_half_of_its_fp32():
    """kv_attention.KV_FP8_VIA_F32 converts an fp8 cache's values to bf16 by taking the top 16 bits of their fp32
    (one prmt a pair): exact for every e4m3 value (at most 4 significant bits, exponents inside bf16's), the
    subnormals and both zeros included. test_gpu.py runs the PTX itself against Triton's conversion."""
    every = torch.arange(256, dtype=torch.uint8)
    every = every[(every & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # without the two NaNs
    top_half = (every.float().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(top_half.view(torch.int16), every.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(top_half.float(), every.float())


def test_fastgen_switches_tag_the_compile_cache():
    """The FASTGEN_* switches pick the kernels our ops put in a compiled graph, which Inductor's cache key does
    not see: importing kv_attention puts their values in torch.compile's cache key tag, so a run with a switch
    set never loads a graph compiled without it."""
    import os
    import subprocess
    import sys

    code = "import torch, kv_attention; print(torch.compiler.config.cache_key_tag)"
    env = {**os.environ, "FASTGEN_WHOLE_TILES": "0", "FASTGEN_KV_FP8_VIA_F32": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tag = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert "FASTGEN_KV_FP8_VIA_F32=0" in tag.stdout and "FASTGEN_WHOLE_TILES=0" in tag.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGEN_")}
    tag = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert "FASTGEN_" not in tag.stdout
