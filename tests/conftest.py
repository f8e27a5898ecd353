from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def make_examples(n: int, split: str = "train", system_prompt: str = "You are a careful assistant.") -> pd.DataFrame:
    """`n` leg-counting style examples in the EXAMPLES schema (no reasoning_gym needed)."""
    rows = []
    for i in range(n):
        a, b = i % 5 + 1, (i * 3) % 4 + 1
        question = f"How many legs do {a} chickens and {b} dogs have?"
        answer = str(2 * a + 4 * b)
        solution = (f"Each chicken has 2 legs, so {a} chickens have {a} * 2 = {2 * a} legs.\n"
                    f"Each dog has 4 legs, so {b} dogs have {b} * 4 = {4 * b} legs.\n"
                    f"{2 * a} + {4 * b} = {answer} legs in total.\n#### {answer}")
        rows.append({"id": f"ex-{split}-{i:04d}", "split": split, "source": "test/legs", "source_index": i,
                     "system_prompt": system_prompt, "question": question, "solution": solution,
                     "final_answer": answer, "original_question": question, "rewrite_epoch": 0,
                     "rewrite_iterations": 0, "rewrite_engine": "", "rewrite_reason": ""})
    return pd.DataFrame(rows)


@pytest.fixture
def examples():
    return make_examples
