"""Teacher concurrency: wall time of the symbolic_rewrite stage at concurrency 8 vs 1.

Run as: python benchmarks/teacher_concurrency.py [--samples 32] [--latency 1.0]

The teacher is a local OpenAI-compatible endpoint (tests/openai_server.py) answering TextGrad's
prompts after a fixed per-call latency, as a remote API would; the student is a tiny random Llama,
so the stage's time is the teacher's. Each concurrency level runs the real stage script with an
empty cache. The last line is one JSON object: seconds at 1 and 8, `speedup`, `identical_outputs`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import OpenAIServer, textgrad_teacher_reply  # noqa: E402
from tiny import build_tiny_model  # noqa: E402


def prepare(work: Path, samples: int) -> dict:
    from conftest import make_examples

    from nslora.config import LoraParams, TrainConfig
    from nslora.schemas import EXAMPLES, SELECTION, write_table
    from nslora.numerical.training import init_adapter

    model = build_tiny_model(work / "tiny")
    train = make_examples(samples)
    # Distinct questions: a repeated one would be a cache hit, free at concurrency 1 only.
    train["question"] = [f"On farm {i}: {q}" for i, q in enumerate(train["question"])]
    train["original_question"] = train["question"]
    write_table(train, work / "train.parquet", EXAMPLES)
    adapter = init_adapter(model, train, LoraParams(r=4), TrainConfig(batch_size=4), work / "epoch_1")
    selection = pd.DataFrame({
        "id": train["id"], "epoch": 1, "criterion": "grad_norm", "score": 0.0, "eligible": True,
        "rank": range(samples), "selected": True, "student_output": "", "student_answer": "[invalid]",
        "correct": False})
    write_table(selection, work / "selection.parquet", SELECTION)
    return {"model": model, "adapter": adapter}


def run_stage(work: Path, inputs: dict, base_url: str, concurrency: int) -> tuple[float, str]:
    run = work / f"c{concurrency}"
    run.mkdir()
    params = {"model": {"name": str(inputs["model"]), "precision": "fp32"},
              "symbolic": {"max_iters": 1, "student_max_new_tokens": 4},
              "teacher": {"engine": "openai", "model": "test-model", "base_url": base_url,
                          "concurrency": concurrency, "max_calls_per_epoch": 10_000}}
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(ROOT / "stages" / "symbolic_rewrite.py"), "--params", "params.yaml",
           "--epoch", "1", "--base", str(inputs["model"]), "--adapter", str(inputs["adapter"]),
           "--train", str(work / "train.parquet"), "--selection", str(work / "selection.parquet"),
           "--cache-dir", str(run / "cache"), "--out", "train_1.parquet", "--log", "rewrites.parquet",
           "--system-prompt-out", "system_prompt.txt", "--metrics", "metrics.json"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=run, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"stage failed at concurrency {concurrency}:\n{result.stderr[-3000:]}")
    digest = hashlib.sha256((run / "train_1.parquet").read_bytes() + (run / "rewrites.parquet").read_bytes())
    return seconds, digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per teacher call (hosted APIs: 1-5 s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, OpenAIServer(reply=textgrad_teacher_reply,
                                                            latency=args.latency) as server:
        work = Path(tmp)
        inputs = prepare(work, args.samples)
        results = {}
        for concurrency in (1, 8):
            before = server.count
            seconds, digest = run_stage(work, inputs, server.base_url, concurrency)
            results[concurrency] = {"seconds": round(seconds, 2), "teacher_calls": server.count - before,
                                    "outputs_sha256": digest}
            print(f"concurrency {concurrency}: {seconds:6.1f} s, {server.count - before} calls", flush=True)
    print(json.dumps({
        "samples": args.samples, "latency_s": args.latency,
        "concurrency_1": results[1], "concurrency_8": results[8],
        "speedup": round(results[1]["seconds"] / results[8]["seconds"], 2),
        "identical_outputs": results[1]["outputs_sha256"] == results[8]["outputs_sha256"],
    }))


if __name__ == "__main__":
    main()
