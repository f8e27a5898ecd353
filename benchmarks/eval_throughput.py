"""Evaluation throughput: the `evaluate` stage vs lm-eval's HF model at its best batch size.

Run as: python benchmarks/eval_throughput.py [--questions 64] [--model-dir models/base]
                                             [--batch-sizes 16,32,64] [--repeats 1] [--old]

All sides evaluate the pre-trained model (SmolLM2-135M-Instruct unless --model-dir says otherwise)
on the same quick-start test questions through the same lm-eval task (greedy, 256 new tokens, chat
template, system prompt). The fair baseline is lm-eval's HF backend as a competent user runs it on
this machine: bf16 weights where bf16 is fast (else fp32), `max_length=2048` (prompt and answer
fit; lm-eval's `auto` probes at max_length), at each of --batch-sizes; the fastest is the baseline. `--old` adds the old baseline,
lm-eval as it comes (model dtype, batch size 1). The stage uses its own settings (params' eval
batch size, bf16, its generation fixes).

Since decoding is greedy, the generated texts are compared answer by answer with the baseline's:
`identical` counts the exact matches; each difference is listed with the first differing character,
so it can be explained (bf16 rounding differs with the padding of a different batch composition;
`lm_eval_identical_vs_best` measures how much lm-eval's own texts move between its batch sizes).
With --repeats N every side runs N times, in rounds, and its fastest run counts (this 2-core
machine's speed drifts by ~20% between runs). Each side runs in its own process (peak RSS its own;
an out-of-memory `auto` probe cannot take the others down). The last line is one JSON object with
every side, `speedup` (questions/s against the fastest fair baseline) and, with --old, `speedup_old`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

LM_EVAL_MAX_LENGTH = 2048


def limit_memory() -> None:
    """Cap a side's address space at 3/4 of RAM: an oversized allocation (lm-eval's `auto` probe
    starts at batch 64) then fails inside that process, where the probe halves its batch, instead
    of waking the kernel's OOM killer, which may pick another process."""
    import os

    cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_side(side: str, model_dir: str, test_path: str, system_prompt: str) -> dict:
    """One side: "ours", "lm_eval_old" (model dtype, batch 1) or "lm_eval_bs<N>"/"lm_eval_bsauto"."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from nslora.config import EvalConfig
    from nslora.evaluation.harness import evaluate
    from nslora.models import resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if side == "ours":
        cfg = EvalConfig()
        summary, predictions = evaluate(model_dir, None, test_path, system_prompt, cfg)
        settings = {"batch_size": cfg.batch_size}
    else:
        batch = side.removeprefix("lm_eval_bs") if side != "lm_eval_old" else "1"
        # bf16 where it is fast, else fp32 (emulated bf16 is slower): what `precision: auto` gives ours.
        dtype = str(resolve_dtype("auto", torch.device(device))).replace("torch.", "")
        kwargs = {} if side == "lm_eval_old" else {"dtype": dtype, "max_length": LM_EVAL_MAX_LENGTH}
        lm = HFLM(pretrained=model_dir, batch_size=batch, device=device, **kwargs)
        summary, predictions = evaluate(model_dir, None, test_path, system_prompt, EvalConfig(), lm=lm)
        settings = {"batch_size": batch, **kwargs, "detected_batch_size": getattr(lm, "batch_sizes", None)}
    return {**{k: summary[k] for k in ("n", "seconds", "questions_per_s", "accuracy")}, **settings,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "outputs": dict(zip(predictions["id"], predictions["output"]))}


def compare(ours: dict[str, str], theirs: dict[str, str]) -> dict:
    """Exact matches of the generated texts, and where each differing pair first parts."""
    differences = []
    for qid, text in ours.items():
        other = theirs.get(qid)
        if other != text:
            other = other or ""
            at = next((i for i, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
            differences.append({"id": qid, "first_difference_at_char": at,
                                "ours": text[max(0, at - 20):at + 40], "theirs": other[max(0, at - 20):at + 40]})
    return {"identical": len(ours) - len(differences), "of": len(ours), "differences": differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--model-dir", default=None, help="Materialised HF model (default: embedded SmolLM2).")
    parser.add_argument("--batch-sizes", default="16,32,64",
                        help="lm-eval batch sizes to try (`auto` too, but its probe at max_length takes >10 min on CPU).")
    parser.add_argument("--old", action="store_true", help="Also run lm-eval as it comes (batch size 1).")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run every side this many times, in rounds; each side's fastest run counts.")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--test", help=argparse.SUPPRESS)
    parser.add_argument("--system-prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.model_dir, args.test, args.system_prompt)))
        return

    from nslora.config import DataConfig
    from nslora.data import prepare_examples
    from nslora.models import materialize
    from nslora.schemas import EXAMPLES, write_table

    sides = [f"lm_eval_bs{b.strip()}" for b in args.batch_sizes.split(",")] + ["ours"]
    if args.old:
        sides.insert(0, "lm_eval_old")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(materialize("embedded:smollm2", Path(tmp) / "base"))
        data = DataConfig(train_size=1, test_size=args.questions)
        _, test = prepare_examples(data)
        test_path = str(write_table(test, Path(tmp) / "test.parquet", EXAMPLES))
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # rounds of every side in turn: a slow spell hits all sides alike
            for side in sides:
                if side in results:  # failed before
                    continue
                out = subprocess.run([sys.executable, __file__, "--side", side, "--model-dir", model_dir,
                                      "--test", test_path, "--system-prompt", data.system_prompt],
                                     capture_output=True, text=True, preexec_fn=limit_memory)
                if out.returncode != 0:  # e.g. the auto probe killed for memory: report it, keep the rest
                    results[side] = {"failed": f"exit {out.returncode}: {out.stderr.strip()[-300:]}"}
                    print(f"{side:16s} failed (exit {out.returncode})", flush=True)
                    continue
                run = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(side, []).append(run)
                print(f"{side:16s} {run['questions_per_s']:.3f} questions/s ({run['seconds']} s, "
                      f"peak RSS {run['peak_rss_mb']} MB)", flush=True)
        for side, side_runs in runs.items():
            if side not in results:
                results[side] = {**max(side_runs, key=lambda run: run["questions_per_s"]),
                                 "runs_questions_per_s": [run["questions_per_s"] for run in side_runs]}

    fair = [s for s in sides if s.startswith("lm_eval_bs") and "questions_per_s" in results[s]]
    if "questions_per_s" not in results["ours"] or not fair:
        sys.exit(f"no comparison possible: {json.dumps(results)[:2000]}")
    best = max(fair, key=lambda s: results[s]["questions_per_s"])
    ours = results["ours"]
    summary = {"model": args.model_dir or "embedded:smollm2", "questions": args.questions, "best_lm_eval": best,
               "speedup": round(ours["questions_per_s"] / results[best]["questions_per_s"], 2),
               "texts_vs_best": compare(ours["outputs"], results[best]["outputs"]),
               "identical_vs_each": {s: compare(ours["outputs"], results[s]["outputs"])["identical"]
                                     for s in sides if s != "ours" and "outputs" in results[s]},
               # lm-eval against itself at its other batch sizes: how far batch composition alone
               # moves greedy bf16 texts, the yardstick for ours' differences.
               "lm_eval_identical_vs_best": {s: compare(results[best]["outputs"], results[s]["outputs"])["identical"]
                                             for s in fair if s != best}}
    if "questions_per_s" in results.get("lm_eval_old", {}):
        summary["speedup_old"] = round(ours["questions_per_s"] / results["lm_eval_old"]["questions_per_s"], 2)
    for side in results.values():
        side.pop("outputs", None)
    print(json.dumps({**results, **summary}))


if __name__ == "__main__":
    main()
