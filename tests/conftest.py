import sys
from pathlib import Path

# Tests import the top-level modules (model, generate, tokenizer, quantize) and scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
