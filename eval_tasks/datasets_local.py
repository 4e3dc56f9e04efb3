"""Datasets of the local tasks, built here so that no task needs the Hugging Face hub.

lm-eval calls these through `custom_dataset: !function datasets_local.NAME` in the YAML files.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _dataset(splits: dict):
    import datasets

    return {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}


def facts(**kwargs):
    """40 everyday-knowledge questions with four choices (written for this repo)."""
    rows = [json.loads(line) for line in (HERE / "facts.jsonl").read_text().splitlines()]
    return _dataset({"test": rows})


def arithmetic(**kwargs):
    """Sums of two numbers below 50: 3 few-shot examples and 50 questions, fixed by a seed."""
    rng = random.Random(0)
    rows = [
        {"a": a, "b": b, "answer": str(a + b)} for a, b in ((rng.randint(1, 49), rng.randint(1, 49)) for _ in range(53))
    ]
    return _dataset({"train": rows[:3], "test": rows[3:]})


def botchan(**kwargs):
    """Botchan (scripts/assets.py), after its Project Gutenberg header: 20 documents of 40 lines."""
    sys.path.insert(0, str(HERE.parent))
    from scripts.assets import botchan_path

    lines = botchan_path().read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    docs = ["\n".join(lines[s : s + 40]) for s in range(start, start + 20 * 40, 40)]
    return _dataset({"test": [{"text": doc} for doc in docs]})
