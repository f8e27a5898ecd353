"""Downstream transfer: does the remade dataset fine-tune *another* model better than the original?

Two arms, identical in everything but the questions: the same base model, LoRA initialisation,
batch plan (same samples in the same batches, in the same order), seeds, epochs, system prompt and
test set. One arm trains on the original training set, the other on the remade one (rewritten
questions, the same gold answers); both are evaluated with lm-eval exactly like the pipeline's
`evaluate` stage. The paper's version of this: remade GSM8K fine-tunes Qwen2.5-7B-Instruct to 75.96
vs 70.36 on the original data.

    result = run_downstream(original, remade, Path("data/test.parquet"), materialized("embedded:gemma3-270m"),
                            Path(".nslora/downstream"), params.lora, params.train, params.eval,
                            epochs=1, precision="auto")
    result["arms"]["remade"]["accuracy"] - result["arms"]["original"]["accuracy"] == result["difference"]

From the command line: `nslora downstream --help` (defaults: Gemma 3 270M, data/train/epoch_0.parquet
vs data/remade/train.parquet, writes metrics/downstream.json).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path

import pandas as pd

from .config import EvalConfig, LoraParams, TrainConfig, to_dict
from .evaluation.harness import evaluate
from .models import model_source
from .schemas import EXAMPLES, PREDICTIONS, system_prompt_of, write_table
from .numerical.training import BATCHES_FILE, LoraTrainer, data_hash, init_adapter

log = logging.getLogger(__name__)

ARMS = ("original", "remade")

# Columns a training table must have, in either of the two accepted layouts.
_EXAMPLES_REQUIRED = ("id", "question", "solution", "final_answer", "system_prompt")
_REMADE_REQUIRED = ("id", "question", "answer", "final_answer", "system_prompt")


def to_examples(df: pd.DataFrame, name: str = "training set") -> pd.DataFrame:
    """A training table as EXAMPLES rows (`nslora.schemas.EXAMPLES`, the trainer's input).

    Accepts either layout explicitly:
      - EXAMPLES (`data/train/epoch_k.parquet`): returned with its columns as they are;
      - REMADE (`data/remade/train.parquet`, the published remade dataset): `answer` becomes
        `solution`, `teacher` becomes `rewrite_engine`; provenance columns it lacks are filled
        (`original_question` = `question`, rewrite counters 0, empty strings).

    Args:
        df: the table.
        name: what to call it in error messages (e.g. the file name).

    Returns:
        A new DataFrame with exactly the EXAMPLES columns, in `df`'s row order.

    Raises:
        ValueError: neither layout fits (the message names the missing columns), or ids repeat.
    """
    if "solution" in df.columns:
        required, rename = _EXAMPLES_REQUIRED, {}
    else:
        required, rename = _REMADE_REQUIRED, {"answer": "solution", "teacher": "rewrite_engine"}
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name}: neither an EXAMPLES table (columns {list(_EXAMPLES_REQUIRED)}) nor a remade "
            f"dataset (columns {list(_REMADE_REQUIRED)}): missing {missing}"
        )
    out = df.rename(columns=rename).reset_index(drop=True).copy()
    out["id"] = out["id"].astype(str)
    duplicated = out["id"][out["id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{name}: repeated id(s) {duplicated[:5]}")
    defaults = {
        "split": "train", "source": "", "source_index": pd.Series(range(len(out)), dtype="int64"),
        "original_question": out["question"], "rewrite_epoch": 0, "rewrite_iterations": 0,
        "rewrite_engine": "", "rewrite_reason": "",
    }
    for column, value in defaults.items():
        if column not in out.columns:
            out[column] = value
    for column in ("original_question", "rewrite_engine", "rewrite_reason", "source", "split"):
        out[column] = out[column].fillna("").astype(str)
    # Remade tables leave original_question empty for rows never rewritten by older writers.
    out["original_question"] = out["original_question"].where(out["original_question"] != "", out["question"])
    for column in ("source_index", "rewrite_epoch", "rewrite_iterations"):
        out[column] = out[column].fillna(0).astype("int64")
    for column in ("question", "solution", "final_answer", "system_prompt"):
        out[column] = out[column].astype(str)
    return out[EXAMPLES.names]


def paired_arms(original: pd.DataFrame, remade: pd.DataFrame, system_prompt: str | None = None,
                train_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The two training sets of the comparison: the same ids, gold answers and system prompt.

    Args:
        original, remade: training tables, EXAMPLES or REMADE layout (see `to_examples`).
        system_prompt: the one system prompt both arms train and are evaluated with; None = the
            original set's (a remade set's updated system prompt is replaced, so that only the
            questions differ between the arms, and the result says so).
        train_size: keep only the first N ids of the original set (in its row order), in both arms.

    Returns:
        (original_examples, remade_examples, info): EXAMPLES tables in the same row order, and
        counts: rows, rewritten (questions that differ), remade_system_prompt_replaced.

    Raises:
        ValueError: the sets hold different ids or different gold answers for an id, the original
            set carries several system prompts and none is given, or `train_size` < 1.
    """
    original, remade = to_examples(original, "original"), to_examples(remade, "remade")
    only_original = sorted(set(original["id"]) - set(remade["id"]))
    only_remade = sorted(set(remade["id"]) - set(original["id"]))
    if only_original or only_remade:
        raise ValueError(
            "original and remade training sets must hold the same examples: "
            f"{len(only_original)} id(s) only in the original (first: {only_original[:3]}), "
            f"{len(only_remade)} only in the remade set (first: {only_remade[:3]})"
        )
    if train_size is not None:
        if train_size < 1:
            raise ValueError(f"train_size must be at least 1, got {train_size}")
        original = original.head(train_size)
    remade = remade.set_index("id").loc[original["id"]].reset_index()[EXAMPLES.names]
    for column in ("solution", "final_answer"):
        differs = original["id"][original[column].str.strip().values != remade[column].str.strip().values]
        if len(differs):
            raise ValueError(
                f"the remade set changes the gold `{column}` of {len(differs)} example(s) (first: "
                f"{differs.iloc[0]}); a remade dataset rewrites questions only, so the two arms "
                "would not learn the same targets"
            )
    if system_prompt is None:
        system_prompt = system_prompt_of(original, "the original set")
    replaced = bool((remade["system_prompt"] != system_prompt).any())
    original = original.assign(system_prompt=system_prompt)
    remade = remade.assign(system_prompt=system_prompt)
    rewritten = int((original["question"].str.strip().values != remade["question"].str.strip().values).sum())
    info = {"rows": len(original), "rewritten": rewritten, "system_prompt": system_prompt,
            "remade_system_prompt_replaced": replaced}
    return original, remade, info


def _train_and_evaluate(arm: str, examples: pd.DataFrame, batches_from: Path | None, test_path: Path,
                        model_dir: Path, work_dir: Path, lora: LoraParams, train: TrainConfig,
                        eval_cfg: EvalConfig, epochs: int, precision: str, attention: str,
                        system_prompt: str, progress: bool) -> dict:
    arm_dir = work_dir / arm
    start = time.perf_counter()
    adapter = init_adapter(model_dir, examples, lora, train, arm_dir / "adapter_0")
    if batches_from is not None:
        # The remade arm replays the original arm's batch plan: batches are grouped by length, so
        # longer rewritten questions could otherwise move samples into other batches, and the
        # comparison would mix a data effect with a batching effect.
        shutil.copyfile(batches_from / BATCHES_FILE, adapter / BATCHES_FILE)
    trainer = LoraTrainer(model_dir, adapter, train, precision=precision, attention=attention,
                          record_grad_norms=False)
    losses, tokens, train_seconds = [], 0, 0.0
    for epoch in range(1, epochs + 1):
        stats = trainer.run_epoch(examples, epoch, progress=progress)
        losses.append(round(float(stats["loss"].mean()), 6))
        tokens += trainer.tokens
        train_seconds += trainer.seconds
        adapter = trainer.save(arm_dir / "adapter", epoch=epoch, train_df=examples,
                               extra={"downstream_arm": arm})
    # Free the training model before lm-eval loads its own copy (two 270M-1B models at once is
    # most of a laptop's memory at float32).
    del trainer
    gc.collect()
    summary, predictions = evaluate(model_dir, adapter, test_path, system_prompt, eval_cfg,
                                    precision=precision, attention=attention, epoch=epochs)
    write_table(predictions, arm_dir / "predictions.parquet", PREDICTIONS)
    return {
        "accuracy": summary["accuracy"],
        "stderr": summary["stderr"],
        "accuracy_strict": summary["accuracy_strict"],
        "n": summary["n"],
        "train_loss": losses,
        "train_tokens": int(tokens),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": summary["seconds"],
        "seconds": round(time.perf_counter() - start, 1),
        "data_sha256": data_hash(examples),
        "adapter": str(adapter),
        "predictions": str(arm_dir / "predictions.parquet"),
    }, predictions


def paired_difference(original: pd.DataFrame, remade: pd.DataFrame) -> dict:
    """Accuracy difference (remade − original) on the same questions, with its paired standard error.

    Both arms answer the same questions, so the per-question difference c_remade − c_original
    (each 0/1) is what varies; its standard error is smaller than the unpaired
    sqrt(se_original² + se_remade²) when the arms agree on most questions.

    Args:
        original, remade: PREDICTIONS tables of the two arms.

    Returns:
        difference, stderr (paired), n, and the discordant counts: only_remade_correct,
        only_original_correct.
    """
    joined = original.set_index("id")[["correct_flexible"]].join(
        remade.set_index("id")[["correct_flexible"]], lsuffix="_original", rsuffix="_remade", how="inner")
    delta = joined["correct_flexible_remade"].astype(float) - joined["correct_flexible_original"].astype(float)
    n = len(delta)
    mean = float(delta.mean()) if n else 0.0
    variance = float(delta.var(ddof=1)) if n > 1 else 0.0
    return {
        "difference": round(mean, 6),
        "stderr": round(math.sqrt(variance / n), 6) if n > 1 else 0.0,
        "n": n,
        "only_remade_correct": int((delta > 0).sum()),
        "only_original_correct": int((delta < 0).sum()),
    }


def run_downstream(original: pd.DataFrame, remade: pd.DataFrame, test_path: Path, model_dir: Path,
                   work_dir: Path, lora: LoraParams, train: TrainConfig, eval_cfg: EvalConfig,
                   epochs: int, precision: str, *, attention: str = "auto",
                   system_prompt: str | None = None, train_size: int | None = None,
                   progress: bool = True) -> dict:
    """Fine-tune `model_dir` with LoRA on the original and on the remade training set, evaluate both.

    Each arm: `init_adapter` (same seed, so the same LoRA initialisation), `epochs` LoraTrainer
    epochs over the same batch plan, then `nslora.evaluation.harness.evaluate` on `test_path` with the same
    system prompt and `eval_cfg`. Adapters and per-question predictions go to `work_dir/<arm>/`.

    Args:
        original: the original training set (EXAMPLES, e.g. data/train/epoch_0.parquet).
        remade: the remade set: REMADE (data/remade/train.parquet) or EXAMPLES with rewritten
            questions (e.g. the last epoch's data/train/epoch_N.parquet); see `to_examples`.
        test_path: test examples Parquet (EXAMPLES), as the pipeline's evaluate stage reads it.
        model_dir: a materialised base model directory (`nslora.models.materialize`).
        work_dir: where the arms' adapters and predictions are written (replaced if present).
        lora, train, eval_cfg: the params sections, used unchanged for both arms.
        epochs: LoRA epochs per arm (at least 1).
        precision: 'auto' | 'bf16' | 'fp32', for training and evaluation.
        attention: attention kernel (ModelConfig.attention).
        system_prompt: the system prompt of both arms; None = the original set's (see `paired_arms`).
        train_size: train on the first N examples of the original set (the same ids in both arms).
        progress: show training progress bars.

    Returns:
        A JSON-serialisable dict: `arms` (per arm: accuracy, stderr, accuracy_strict, n, train_loss
        per epoch, train_tokens, train_seconds, eval_seconds, seconds, data_sha256, adapter,
        predictions), `difference` (remade − original accuracy), `difference_stderr` (paired, on
        the same questions) with the discordant counts under `paired`, `data` (rows, rewritten,
        system prompt, whether the remade set's system prompt was replaced), `settings` (everything
        both arms shared) and `seconds` in total.

    Raises:
        ValueError: `epochs` < 1, or the training sets do not pair up (see `paired_arms`).
        FileNotFoundError: `test_path` does not exist.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    test_path, model_dir, work_dir = Path(test_path), Path(model_dir), Path(work_dir)
    if not test_path.exists():
        raise FileNotFoundError(f"{test_path}: no such test file")
    start = time.perf_counter()
    original_examples, remade_examples, info = paired_arms(original, remade, system_prompt, train_size)
    if info["rewritten"] == 0:
        log.warning("the remade set has no rewritten question among the %d examples used: both arms "
                    "train on the same data", info["rows"])
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    common = dict(test_path=test_path, model_dir=model_dir, work_dir=work_dir, lora=lora, train=train,
                  eval_cfg=eval_cfg, epochs=epochs, precision=precision, attention=attention,
                  system_prompt=info["system_prompt"], progress=progress)
    arms, predictions = {}, {}
    arms["original"], predictions["original"] = _train_and_evaluate(
        "original", original_examples, None, **common)
    arms["remade"], predictions["remade"] = _train_and_evaluate(
        "remade", remade_examples, work_dir / "original" / "adapter_0", **common)
    paired = paired_difference(predictions["original"], predictions["remade"])
    result = {
        "model": model_source(model_dir),
        "model_dir": str(model_dir),
        "test": str(test_path),
        "data": info,
        "settings": {"lora": to_dict(lora), "train": to_dict(train), "eval": to_dict(eval_cfg),
                     "epochs": epochs, "precision": precision, "attention": attention,
                     "same_batch_plan": True},
        "arms": arms,
        "difference": round(arms["remade"]["accuracy"] - arms["original"]["accuracy"], 6),
        "difference_stderr": paired["stderr"],
        "paired": paired,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (work_dir / "downstream.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown_table(result: dict) -> str:
    """The two arms side by side as a Markdown table, plus the difference line."""
    lines = ["| training set | rewritten questions | accuracy | s.e. | strict-match | train loss | train s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        a = result["arms"][arm]
        rewritten = result["data"]["rewritten"] if arm == "remade" else 0
        lines.append(f"| {arm} | {rewritten}/{result['data']['rows']} | {100 * a['accuracy']:.1f}% "
                     f"| {100 * a['stderr']:.1f} | {100 * a['accuracy_strict']:.1f}% "
                     f"| {a['train_loss'][-1]:.3f} | {a['train_seconds']:.0f} | {a['eval_seconds']:.0f} |")
    p = result["paired"]
    lines.append("")
    lines.append(f"remade − original: {100 * result['difference']:+.1f} points (paired s.e. "
                 f"{100 * result['difference_stderr']:.1f}; {p['only_remade_correct']} question(s) only "
                 f"the remade arm got right, {p['only_original_correct']} only the original arm), "
                 f"n = {p['n']} test questions")
    return "\n".join(lines)
