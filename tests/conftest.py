from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))

from openai_server import local_server  # noqa: E402
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


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    """The real tiny random Llama as the student (it never answers correctly)."""
    from nslora.selection.student import Student

    return Student(tiny_model_dir, None, precision="fp32", attention="eager")


@pytest.fixture(scope="session")
def transformers_serve(tiny_model_dir):
    """`transformers serve` on the tiny model, offline; yields its base URL."""
    cli = shutil.which("transformers")
    if cli is None:
        pytest.skip("the `transformers` CLI is not installed")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        pytest.skip("transformers serve needs transformers[serving] (fastapi, uvicorn)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [cli, "serve", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu"]
    with local_server(command, env, tiny_model_dir.parent / "serve.log", startup_seconds=90) as port:
        yield f"http://127.0.0.1:{port}/v1"

