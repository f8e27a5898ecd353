"""Rewrites valid by construction: TextGrad proposals passing the rewrite checks with the teacher's
grammar on (`teacher.grammar`, llguidance in the local engine) vs off, in one run.

Run as: python benchmarks/rewrite_grammar.py [--questions 8] [--sets quickstart,gsm8k] \
            [--gsm8k ../shared/data/gsm8k] [--max-iters 1] [--concurrency 4]

Question sets (each: the first `--questions` training problems its student answers wrong, with
those answers):
  quickstart  params.yaml's data (reasoning_gym leg_counting), student SmolLM2-135M-Instruct
  gsm8k       GSM8K train problems (profiles/gsm8k_qwen.yaml's data, read from `--gsm8k`), student
              Qwen2.5-Coder-0.5B-Instruct, pre-trained
One teacher (the embedded Qwen2.5-Coder-1.5B-Instruct, the shipped LocalEngine with the shipped
per-kind caps) serves every side, each with an empty reply cache; both sides of a set make the same
proposals except for the grammar of the TGD step's reply. With `--max-iters` > 1 a refused proposal
is fed back as the next iteration's feedback (`symbolic.max_iters`), and a question counts as
passing when any of its proposals passed.

Printed per side: seconds per question (teacher calls and the student's re-answers, as in the
stage), proposals made, tagged, passing the unchanged checks, and
why the others were refused. The last line is one JSON object: per set, passing with the grammar
on and off, and seconds per question on each side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_throughput import wrong_questions  # noqa: E402  (the same question choice)


def question_sets(names: list[str], n: int, gsm8k: Path):
    """{set name: (params, samples with the student's answers, student)} for each set."""
    from nslora.models import materialized
    from nslora_cli.params_file import load_params

    sets = {}
    for name in names:
        if name == "quickstart":
            params = load_params(ROOT / "params.yaml")
        elif name == "gsm8k":
            if not (gsm8k / "train.jsonl").exists():
                raise SystemExit(f"--gsm8k {gsm8k}: no train.jsonl there (the GSM8K set needs the data)")
            params = load_params(ROOT / "profiles" / "gsm8k_qwen.yaml")
            params = dataclasses.replace(params, data=dataclasses.replace(params.data, path=str(gsm8k)))
        else:
            raise SystemExit(f"--sets: unknown set {name!r} (quickstart, gsm8k)")
        samples, student = wrong_questions(params, n, materialized(params.model.name))
        print(f"{name}: {len(samples)} questions the pre-trained student gets wrong", flush=True)
        sets[name] = (params, samples, student)
    return sets


def run_side(engine, grammar: bool, params, samples, student, max_iters: int, concurrency: int,
             cache: Path) -> dict:
    import pandas as pd

    from nslora.symbolic import TextGradRewriter, rewrite_epoch
    from nslora.teacher import CachedTeacher

    t = params.teacher
    teacher = CachedTeacher(engine, cache, max_tokens=t.max_tokens, grammar=grammar, max_tokens_by_kind={
        "critique": t.critique_max_tokens, "feedback": t.feedback_max_tokens, "rewrite": t.rewrite_max_tokens})
    cfg = dataclasses.replace(params.symbolic, max_iters=max_iters, similarity_threshold=None)
    train = pd.DataFrame([{"id": s.id, "question": s.question, "original_question": s.original_question,
                           "solution": s.solution, "final_answer": s.final_answer,
                           "system_prompt": s.system_prompt} for s, _ in samples])
    selected = pd.DataFrame({"id": train["id"], "student_output": [out for _, out in samples], "correct": False})
    engine.forget_prefixes()  # no side starts from prompt prefixes the other one cached
    start = time.perf_counter()
    result = rewrite_epoch(train, selected, TextGradRewriter(teacher, student, cfg), student, 1, cfg,
                           concurrency, "benchmark", progress=False)
    wall = time.perf_counter() - start
    log = result.log
    passing = int(log["accepted"].sum())  # a question changes only through a proposal that passed
    side = {"grammar": grammar, "questions": len(samples), "wall_s": round(wall, 1),
            "s_per_question": round(wall / len(samples), 1), "passing": passing,
            "proposals": result.metrics["proposals"],
            "refused_by_reason": dict(sorted(Counter(log.loc[~log["accepted"], "reason"]).items())),
            "constrained_calls": teacher.stats()["constrained"],
            "completion_tokens": teacher.stats()["completion_tokens"]}
    print(json.dumps(side), flush=True)
    return side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--sets", default="quickstart,gsm8k")
    parser.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k")
    parser.add_argument("--max-iters", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--teacher", default="embedded:qwen2.5-coder-1.5b")
    args = parser.parse_args()

    import torch

    from nslora.models import materialized
    from nslora.teacher.local_engine import LocalEngine

    sets = question_sets(args.sets.split(","), args.questions, args.gsm8k)
    engine = LocalEngine(materialized(args.teacher, dtype=torch.bfloat16), "auto", name=args.teacher,
                         max_batch=args.concurrency)
    summary: dict = {"teacher": args.teacher, "max_iters": args.max_iters, "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (params, samples, student) in sets.items():
            sides = {on: run_side(engine, on, params, samples, student, args.max_iters, args.concurrency,
                                  Path(tmp) / f"{name}-{on}") for on in (True, False)}
            summary[name] = {"questions": len(samples),
                             "passing_grammar_on": sides[True]["passing"], "passing_grammar_off": sides[False]["passing"],
                             "s_per_question_on": sides[True]["s_per_question"],
                             "s_per_question_off": sides[False]["s_per_question"]}
    engine.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
