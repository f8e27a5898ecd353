"""Evaluation throughput: the `evaluate` stage vs stock lm-eval at batch size 1, same questions.

Run as: python benchmarks/eval_throughput.py [--questions 16] [--model-dir models/base]

Both evaluate the pre-trained model (SmolLM2-135M-Instruct unless --model-dir says otherwise) on the
same quick-start test questions through the same lm-eval task (256 new tokens, chat template,
system prompt). The baseline is lm-eval's HF backend as it comes (model dtype, batch size 1); the
stage uses batched generation, bf16 where the CPU supports it and its generation fixes.
The last line is one JSON object with both runs and `speedup` (questions/s ratio).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--model-dir", default=None, help="Materialised HF model (default: embedded SmolLM2).")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from nslora.config import DataConfig, EvalConfig
    from nslora.data import prepare_examples
    from nslora.evaluation.harness import evaluate
    from nslora.models import materialize
    from nslora.schemas import EXAMPLES, write_table

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(materialize("embedded:smollm2", Path(tmp) / "base"))
        data = DataConfig(train_size=1, test_size=args.questions)
        _, test = prepare_examples(data)
        test_path = write_table(test, Path(tmp) / "test.parquet", EXAMPLES)
        results = {}

        start = time.perf_counter()
        stock = HFLM(pretrained=model_dir, batch_size=1, device="cuda" if torch.cuda.is_available() else "cpu")
        load = time.perf_counter() - start
        summary, _ = evaluate(model_dir, None, test_path, data.system_prompt, EvalConfig(batch_size=1), lm=stock)
        results["lm_eval_bs1"] = {**_figures(summary), "load_seconds": round(load, 1)}
        print(f"lm-eval bs1 {summary['questions_per_s']:.3f} questions/s ({summary['seconds']} s)", flush=True)

        cfg = EvalConfig()
        summary, _ = evaluate(model_dir, None, test_path, data.system_prompt, cfg)
        results["ours"] = {**_figures(summary), "batch_size": cfg.batch_size}
        print(f"evaluate    {summary['questions_per_s']:.3f} questions/s ({summary['seconds']} s)", flush=True)

    results["speedup"] = round(results["ours"]["questions_per_s"] / results["lm_eval_bs1"]["questions_per_s"], 2)
    results["same_accuracy"] = results["ours"]["accuracy"] == results["lm_eval_bs1"]["accuracy"]
    print(json.dumps(results))


def _figures(summary: dict) -> dict:
    return {k: summary[k] for k in ("n", "seconds", "questions_per_s", "accuracy")}


if __name__ == "__main__":
    main()
