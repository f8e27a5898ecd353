"""Teacher throughput: seconds per TextGrad proposal with the embedded teacher, shipped engine vs
the previous one, on the same quick-start questions in one run.

Run as: python benchmarks/teacher_throughput.py [--teacher embedded:qwen2.5-coder-1.5b] \
            [--questions 8] [--baseline-questions 8] [--concurrency 4] [--engine local|vllm]

Questions: the first quick-start (params.yaml `data`) training problems that the pre-trained student
(SmolLM2-135M-Instruct) answers wrong, with its answers. Each side runs one TextGrad iteration per
question (critique, two textual gradients, the TGD step: 4 teacher calls) through the project's
`TextGradRewriter` at `--concurrency`, with an empty reply cache:

  shipped   LocalEngine batching the concurrent calls, reusing the KV cache of prompt prefixes
            already seen (TextGrad's system prompts), decoding with int8 weight copies, replies
            capped per kind of call (teacher.critique/feedback/rewrite_max_tokens in params.yaml)
  baseline  the engine before: one call at a time (max_batch=1), bf16 decode, every prompt
            prefilled in full, every reply capped at 512 tokens (teacher.max_tokens' old default)

With `--engine vllm` the baseline is vLLM instead: `vllm serve` of the same directory on 127.0.0.1
(bf16, run by `--vllm-python`, default $NSLORA_VLLM_PYTHON or this python; on a CPU eager mode and a
2 GiB KV cache), reached through the project's OpenAIEngine with the shipped side's per-kind caps;
its start-up is timed apart, as the local engine's loading is, and its log is kept.

Both load the same bf16 teacher on this machine's CPU. Printed per side: wall seconds, seconds per
proposal (wall / questions), teacher tokens, proposals with tags and passing the rewrite checks
(and why the others did not).
The last line is one JSON object with both and `"speedup"` (baseline s/proposal over shipped).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from openai_server import local_server  # noqa: E402  (starts and stops vllm serve)


def wrong_questions(params, n: int, base_dir: Path) -> list[tuple]:
    """The first `n` training samples the pre-trained student gets wrong, with its answers."""
    from nslora.data import prepare_examples
    from nslora.selection.student import Student
    from nslora.answers import is_right
    from nslora.symbolic import sample_from_row

    train, _ = prepare_examples(params.data)
    student = Student(base_dir, None, params.model.precision, params.model.attention, batch_size=32)
    rows = list(train.head(8 * n).itertuples())
    outputs = student.answer(params.data.system_prompt, [r.question for r in rows],
                             params.symbolic.student_max_new_tokens)
    wrong = [(sample_from_row(r, params.data.system_prompt), out) for r, out in zip(rows, outputs)
             if not is_right(out, r.final_answer)]
    return wrong[:n], student


def run_side(name: str, engine, caps: dict | None, samples: list[tuple], student, params,
             concurrency: int, cache: Path) -> dict:
    from nslora.symbolic import TextGradRewriter, check_proposal
    from nslora.teacher import CachedTeacher

    teacher = CachedTeacher(engine, cache, max_tokens=512, max_tokens_by_kind=caps)
    rewriter = TextGradRewriter(teacher, student, params.symbolic)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        proposals = list(pool.map(lambda s: rewriter.propose(s[0], s[0].question, s[1], 1), samples))
    wall = time.perf_counter() - start
    checks = [p.failure or check_proposal(s[0], s[0].question, p.question, params.symbolic, None)
              for s, p in zip(samples, proposals)]
    stats = teacher.stats()
    result = {"engine": name, "questions": len(samples), "wall_s": round(wall, 1),
              "s_per_proposal": round(wall / len(samples), 1),
              "tagged": sum(p.question is not None for p in proposals),
              "passing_checks": checks.count(None),
              "rejected_by_reason": dict(sorted(Counter(c for c in checks if c).items())),
              "failures": stats["failures"],
              "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
              "by_kind": stats["by_kind"],
              "batch_sizes": sorted(set(getattr(engine, "batch_sizes", []))),
              "prefill_tokens": getattr(engine, "prefill_tokens", None)}
    print(json.dumps(result), flush=True)
    return result


@contextlib.contextmanager
def vllm_server(python: str, model_dir: Path, name: str, log_path: Path):
    """`vllm serve` on a free local port for the block; yields (base URL, start-up seconds)."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": os.environ.get("VLLM_TARGET_DEVICE", "cpu"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", "{port}",
           "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager"]
    start = time.perf_counter()
    with local_server(cmd, env, log_path, startup_seconds=900) as port:
        yield f"http://127.0.0.1:{port}/v1", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="embedded:qwen2.5-coder-1.5b")
    parser.add_argument("--teacher-dir", type=Path, help="Materialised teacher (default: cached).")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--baseline-questions", type=int, default=None,
                        help="Questions for the baseline (default: all; fewer saves its ~3 min each).")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--engine", choices=["local", "vllm"], default="local",
                        help="The baseline: 'local' (the engine before) or 'vllm' (vllm serve).")
    parser.add_argument("--vllm-python", default=os.environ.get("NSLORA_VLLM_PYTHON", sys.executable))
    parser.add_argument("--vllm-log", type=Path, default=Path("vllm_serve.log"))
    args = parser.parse_args()

    import torch

    from nslora.models import materialized
    from nslora.teacher.local_engine import LocalEngine
    from nslora_cli.params_file import load_params

    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, symbolic=dataclasses.replace(params.symbolic, max_iters=1))
    base = materialized(params.model.name)
    teacher_dir = args.teacher_dir or materialized(args.teacher, dtype=torch.bfloat16)

    samples, student = wrong_questions(params, args.questions, base)
    print(f"{len(samples)} questions the pre-trained student gets wrong", flush=True)
    t = params.teacher
    caps = {"critique": t.critique_max_tokens, "feedback": t.feedback_max_tokens,
            "rewrite": t.rewrite_max_tokens}
    startup = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shipped_engine = LocalEngine(teacher_dir, params.model.precision, name=args.teacher,
                                     max_batch=args.concurrency)
        startup["shipped"] = round(time.perf_counter() - start, 1)
        shipped = run_side("shipped: batched LocalEngine, per-kind caps", shipped_engine, caps,
                           samples, student, params, args.concurrency, Path(tmp) / "shipped")
        shipped_engine.close()
        del shipped_engine
        if args.engine == "vllm":
            from nslora.teacher.openai_engine import OpenAIEngine

            with vllm_server(args.vllm_python, teacher_dir, args.teacher, args.vllm_log) as (url, seconds):
                startup["baseline"] = round(seconds, 1)
                baseline = run_side("baseline: vllm serve (bf16), per-kind caps",
                                    OpenAIEngine(url, args.teacher, api_key="unused", timeout=600), caps,
                                    samples[:args.baseline_questions], student, params, args.concurrency,
                                    Path(tmp) / "baseline")
        else:
            start = time.perf_counter()
            baseline_engine = LocalEngine(teacher_dir, params.model.precision, name=args.teacher, max_batch=1,
                                          int8_decode=False, prefix_cache_tokens=0)
            startup["baseline"] = round(time.perf_counter() - start, 1)
            baseline = run_side("baseline: one call at a time, 512 tokens", baseline_engine, None,
                                samples[:args.baseline_questions], student, params, args.concurrency,
                                Path(tmp) / "baseline")
            baseline_engine.close()
    print(json.dumps({
        "teacher": args.teacher, "concurrency": args.concurrency, "baseline_engine": args.engine,
        "startup_s": startup,
        "shipped_s_per_proposal": shipped["s_per_proposal"],
        "baseline_s_per_proposal": baseline["s_per_proposal"],
        "shipped_questions": shipped["questions"], "baseline_questions": baseline["questions"],
        "shipped_passing": shipped["passing_checks"], "baseline_passing": baseline["passing_checks"],
        "speedup": round(baseline["s_per_proposal"] / shipped["s_per_proposal"], 2)}))


if __name__ == "__main__":
    main()
