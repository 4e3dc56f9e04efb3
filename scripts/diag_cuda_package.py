"""Which way of packaging the decode step loads and runs on CUDA? (Issue 19: on torch 2.11, our CUDA
package segfaults inside AOTIModelPackageLoader's constructor, before metadata or constants.)

For each variant: export a tiny random model's decode step (scripts/export.export_steps), compile and
package it, then load and run it in a fresh process, so a segfault kills only that child, and check
its greedy token and logits against the eager step. One line per variant:

    python scripts/diag_cuda_package.py                         # every variant, ~2 min each on a GPU
    python scripts/diag_cuda_package.py --variants ours,in_so
    python scripts/diag_cuda_package.py --device cpu            # the control: ours works on the CPU

Variants: ours (what scripts/export.py does: aot_compile per program, package_aoti, weights not in
the .so, our metadata), no_metadata, in_so (weights compiled into the .so), compile_and_package
(torch._inductor.aoti_compile_and_package, weights not in the .so), sdpa (ours with SDPA attention, so
no flex template kernel in the .so), linear (the control: one nn.Linear through
aoti_compile_and_package, nothing of ours: if it segfaults too, AOTI loading is broken on the machine).
"""

import argparse
import faulthandler
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model import ModelArgs, Transformer  # noqa: E402

VARIANTS = ("linear", "ours", "sdpa", "no_metadata", "in_so", "compile_and_package")
BATCH, SLOTS = 2, 256


def tiny_model(device) -> Transformer:
    """The same random model in every process (seeded), with its cache set up."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128, intermediate_size=512, vocab_size=512)
    model = Transformer(args).to(device).eval()
    model.setup_caches(BATCH, SLOTS)
    return model


def step_inputs(device):
    tokens = torch.tensor([[5], [17]], device=device)
    return tokens, torch.tensor([3], device=device), torch.zeros(BATCH, dtype=torch.int32, device=device)


def control_linear(device):
    """The nn.Linear control and its input, the same in every process (seeded)."""
    torch.manual_seed(0)
    return torch.nn.Linear(64, 32).to(device), torch.randn(4, 64, device=device)


def make(variant: str, device, path: Path):
    """Export and package the decode step the variant's way; returns (model name in the package, user-managed)."""
    from export import export_steps
    from torch._inductor.package import package_aoti

    if variant == "linear":
        linear, x = control_linear(device)
        torch._inductor.aoti_compile_and_package(torch.export.export(linear, (x,)), package_path=str(path))
        return "model", False
    model = tiny_model(device)
    attention = "flex" if device.type == "cuda" and variant != "sdpa" else "sdpa"
    program = export_steps(model, BATCH, 16, programs=("decode",), attention=attention)["decode"]
    options = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": variant != "in_so"}
    if variant == "ours":
        options["aot_inductor.metadata"] = {"fastgen": json.dumps({"variant": variant})}
    with torch.no_grad():
        if variant == "compile_and_package":
            configs = {"aot_inductor.package_constants_in_so": False}
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
            return "model", True
        files = torch._inductor.aot_compile(program.module(), program.example_inputs[0], options=options)
    package_aoti(str(path), {"decode": files})
    return "decode", variant != "in_so"


def load_and_run(variant: str, path: str, name: str, user_managed: bool, device) -> str:
    """In the child: load the package, hand it the model's tensors, run one step, compare with eager."""
    from torch._inductor.package import load_package

    from package import PackagedStep, constant_names

    if variant == "linear":
        linear, x = control_linear(device)
        print("loading", flush=True)
        runner = load_package(path, name)
        print("loaded", flush=True)
        out = runner(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        diff = (out - linear(x)).abs().max().item()
        return f"runs: max |diff| {diff:.2e}"
    model = tiny_model(device)
    with torch.no_grad():
        want_token, want_logits = PackagedStep(model)(*step_inputs(device))
    model = tiny_model(device)  # a fresh cache for the package's own step
    print("loading", flush=True)
    runner = load_package(path, name)
    print("loaded", flush=True)
    if user_managed:
        constants = constant_names(model)
        runner.load_constants(
            {k: constants[k] for k in runner.get_constant_fqns()}, check_full_update=True, user_managed=True
        )
    token, logits = runner(*step_inputs(device))
    diff = (logits.float() - want_logits.float()).abs().max().item()
    same = torch.equal(token.cpu(), want_token.cpu())
    return f"runs: greedy token {'equal' if same else 'DIFFERENT'}, max |logit diff| {diff:.2e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "PKG", "NAME", "USER_MANAGED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.child:
        faulthandler.enable()
        variant, path, name, user_managed = args.child
        print(load_and_run(variant, path, name, user_managed == "1", device), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                print(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
                return 2
            path = Path(tmp) / f"{variant}.pt2"
            t0 = time.perf_counter()
            try:
                name, user_managed = make(variant, device, path)
            except Exception as e:  # a variant that does not build is a result too
                rows.append(f"{variant}: build failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            built_s = time.perf_counter() - t0
            child = subprocess.run(
                [sys.executable, __file__, "--device", args.device]
                + ["--child", variant, str(path), name, str(int(user_managed))],
                capture_output=True,
                text=True,
            )
            lines = (child.stdout + child.stderr).strip().splitlines()
            if child.returncode == 0:  # its result is its last stdout line (stderr may end with a warning:
                # a CUDA build of torch on a machine without a GPU warns about the missing CUDA runtime)
                outcome = (child.stdout.strip().splitlines() or ["no output"])[-1]
            else:
                stage = (
                    "while loading" if "loading" in child.stdout and "loaded" not in child.stdout else "after loading"
                )
                # the error line and the innermost Python frame faulthandler printed
                error = [line for line in lines if "Error" in line or "error" in line][:1]
                frame = [line.strip() for line in lines if line.startswith("  File")][:1]
                outcome = f"exit {child.returncode} {stage}: {' / '.join(error + frame)[:300]}"
            rows.append(f"{variant}: built in {built_s:.0f} s; {outcome}")
            print(rows[-1], flush=True)
    print(f"\n{torch.__version__}, {args.device}:")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
