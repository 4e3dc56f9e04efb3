"""Which of a Triton kernel's pointers torch.compile takes for written, checked on the CPU. In a venv with
torch 2.13 and triton 3.6 (CI's interpreter venv; torch's analysis is internal and moves between versions):

    python scripts/check_kernel_writes.py    # a few seconds; exit 1 if a launch writes what it should not

Under torch.compile a kernel launched through wrap_triton is functionalized: torch reads the pointers it stores
through from Triton's IR for that launch's constexprs, and copies every such argument that shares its tensor with
another argument first. Triton keeps stores that follow a constexpr branch's `return`, so the one-split decode
attention once had its unused partials taken for written, and the compiled step copied y into them each layer
(1.7 us a layer in the H100's int4 step, 2026-12-06). This runs each launch below through torch's own analysis,
compiled for an sm_90 target with a stand-in driver (no GPU), and compares what it writes with what it should.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

import gemv  # noqa: E402
import kv_attention  # noqa: E402


class Sm90Driver:
    """Just what Triton's front end asks a driver for: the target to compile the IR for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def launches(run) -> list[tuple]:
    """(kernel, its arguments by name) for each wrap_triton launch run() makes, none of them executed."""
    recorded = []

    class RecordingLauncher:  # wrap_triton(kernel)[grid](*args, **kwargs), recorded
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append(
                (self.kernel, {**dict(zip(self.kernel.arg_names, args)), **kwargs})
            )

    saved = kv_attention.wrap_triton, gemv.wrap_triton
    kv_attention.wrap_triton = gemv.wrap_triton = RecordingLauncher
    try:
        run()
    finally:
        kv_attention.wrap_triton, gemv.wrap_triton = saved
    return recorded


def written(kernel, kwargs) -> set[str]:
    accesses = identify_accessed_tensors(kernel, kwargs, {})
    return {dep.name for dep in accesses.read_writes.writes if isinstance(kwargs.get(dep.name), torch.Tensor)}


def shared(kwargs, names: set[str]) -> set[str]:
    """Those of names whose tensor's storage another argument passes too (the compiler would copy it first)."""
    storage = {n: t.untyped_storage().data_ptr() for n, t in kwargs.items() if isinstance(t, torch.Tensor)}
    return {n for n in names if any(m != n and ptr == storage[n] for m, ptr in storage.items())}


def attention(cache_slots: int, int8: bool = False):
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    if int8:
        k, v = (torch.randint(-127, 128, (1, 8, cache_slots, 128), dtype=torch.int8) for _ in range(2))
        scales = torch.rand(1, 8, cache_slots, 1, dtype=torch.bfloat16)
    else:
        k, v = (torch.randn(1, 8, cache_slots, 128, dtype=torch.bfloat16) for _ in range(2))
        scales = k
    row_start, slot = torch.zeros(1, dtype=torch.int32), torch.tensor([cache_slots - 1])
    return lambda: kv_attention._split_kv_attention(q, k, scales, v, scales, row_start, slot, 0, int8)


def caches():  # SmolLM2's: 3 kv heads of 64
    return [torch.randn(1, 3, 12, 64) for _ in range(2)]


def int8_weight(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def experts_chosen(tokens, k, n_experts):  # [tokens, k]: each token's k distinct experts
    return torch.stack([torch.randperm(n_experts)[:k] for _ in range(tokens)])


x, slot, angles, norm_weight = torch.randn(1, 576), torch.tensor([7]), torch.randn(64), torch.rand(576)
CASES = [  # name, what it launches, the pointers each launch may write (the wrap_triton kernels, each at least once)
    ("decode attention, one split (64 slots)", attention(64), [{"y_ptr"}]),
    (
        "decode attention, split (8192 slots), then the merge",
        attention(8192),
        [{"acc_ptr", "max_ptr", "sum_ptr"}, {"y_ptr"}],
    ),
    ("int8 decode attention, one split", attention(64, int8=True), [{"y_ptr"}]),
    (
        "decode_gemv, no RoPE (the weight passed as the caches)",
        lambda: gemv.decode_gemv(x, torch.randn(1536, 576)),
        [{"y_ptr"}],
    ),
    (
        "decode_gemv, the norm and SiLU(gate) * up folded",
        lambda: gemv.decode_gemv(x, torch.randn(1536, 576), norm_weight=norm_weight, eps=1e-5, glu=True),
        [{"y_ptr"}],
    ),
    (
        "decode_gemv, int8, the residual folded",
        lambda: gemv.decode_gemv(x, int8_weight(576, 576), torch.rand(576), residual=torch.randn(1, 576)),
        [{"y_ptr"}],
    ),
    (
        "decode_gemv_rope_kv",
        lambda: gemv.decode_gemv_rope_kv(
            x, torch.randn(960, 576), None, norm_weight, None, 1e-5, angles.cos(), angles.sin(), *caches(), slot, 9
        ),
        [{"y_ptr", "k_ptr", "v_ptr"}],
    ),
    (
        "rope_write_kv, the query / key norms",
        lambda: kv_attention.rope_write_kv(
            torch.randn(1, 960), angles.cos(), angles.sin(), *caches(), slot, 9, torch.rand(64), torch.rand(64), 1e-6
        ),
        [{"q_ptr", "k_ptr", "v_ptr"}],
    ),
    (
        "decode_gemv_experts",
        lambda: gemv.decode_gemv_experts(x, torch.randint(0, 16, (8,)), torch.randn(16, 48, 576), norm_weight, 1e-5),
        [{"y_ptr"}],
    ),
    (
        "int8_gemm_few_rows",
        lambda: gemv.int8_gemm_few_rows(torch.randn(4, 576), int8_weight(96, 576), torch.rand(96)),
        [{"part_ptr"}],
    ),
    (
        "int8_expert_gemm_grouped",
        lambda: gemv.int8_expert_gemm_grouped(
            torch.randn(3, 576), experts_chosen(3, 2, 8).flatten(), int8_weight(8, 96, 576), torch.rand(8, 96)
        ),
        [{"part_ptr"}],
    ),
    (
        "expert_gate_up",
        lambda: gemv.expert_gate_up(torch.randn(4, 96), experts_chosen(4, 2, 16), torch.randn(16, 160, 96)),
        [{"h_ptr"}],
    ),
    (
        "expert_down_mix, the residual",
        lambda: gemv.expert_down_mix(
            torch.randn(1, 8, 700),
            experts_chosen(1, 8, 16),
            torch.rand(1, 8),
            torch.randn(16, 300, 700),
            torch.randn(1, 300),
        ),
        [{"y_ptr"}],
    ),
    ("route", lambda: gemv.route(torch.randn(3, 128), 8), [{"ids_ptr", "weights_ptr"}]),
]


def main() -> int:
    driver.set_active(Sm90Driver())
    failed = 0
    for name, run, want in CASES:
        recorded = launches(run)
        got = [written(kernel, kwargs) for kernel, kwargs in recorded]
        aliased = set().union(*(shared(kwargs, w) for (_, kwargs), w in zip(recorded, got)))
        ok = got == want and not aliased
        failed += not ok
        print(
            f"{'ok ' if ok else 'BAD'} {name}: writes {got}"
            + ("" if got == want else f", should write {want}")
            + (f"; {sorted(aliased)} passed as another argument too" if aliased else "")
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
