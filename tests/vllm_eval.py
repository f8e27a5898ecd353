"""Helper of tests/test_vllm_backend.py, run as a script under the python that has the backend:

    python tests/vllm_eval.py BACKEND BASE_DIR ADAPTER_DIR TEST_PARQUET PRECISION OUT_DIR

Evaluates through `nslora.evaluation.harness` (both backends) and writes what lm-eval asked
(`contexts.json`: question id -> the prompt it sent the model) and answered (`predictions.parquet`).
"""

import json
import sys
from pathlib import Path

from nslora.config import EvalConfig
from nslora.evaluation.harness import TASK_NAME, _predictions, build_lm, run_lm_eval
from nslora.schemas import PREDICTIONS, write_table


def main() -> None:
    backend, base, adapter, test, precision, out = sys.argv[1:7]
    cfg = EvalConfig(backend=backend, batch_size=16, max_new_tokens=96)
    if backend == "vllm":
        from nslora.evaluation.vllm_backend import build_vllm_lm

        lm = build_vllm_lm(base, adapter, cfg, precision)
    else:
        lm = build_lm(base, adapter, cfg, precision)
    samples = run_lm_eval(lm, test, "You are a careful assistant.", cfg)["samples"][TASK_NAME]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "contexts.json").write_text(json.dumps({s["doc"]["id"]: s["arguments"][0][0] for s in samples}))
    write_table(_predictions(samples, 0), out / "predictions.parquet", PREDICTIONS)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this module
    main()
