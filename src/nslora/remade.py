"""The remade dataset: the training set after the last symbolic update, with its dataset card.

`synthesize` turns the last epoch's EXAMPLES table (`data/train/epoch_N.parquet`) and the per-epoch
REWRITES logs (`data/rewrites/epoch_k.parquet`) into a table of schema `nslora.schemas.REMADE` and a
Hugging Face style dataset card (Markdown with YAML front matter). The stage
`stages/synthesize_dataset.py` writes both to `data/remade/`; DVC versions and publishes them:

    table, card = synthesize(final_train, [log_1, log_2], criterion="loss_ratio",
                             teacher="openai:gpt-4o", method="nslora",
                             source_license=SOURCE_LICENSES["gsm8k"])
    write_table(table, "data/remade/train.parquet", REMADE)

The gold answers are never rewritten: only questions (and maybe the system prompt) change, so the
remade set fine-tunes other models on the same targets with clearer questions.
"""

from __future__ import annotations

import pandas as pd
import yaml

from nslora.schemas import EXAMPLES, REMADE, REWRITES, require_columns

# Licence of each `data.source` (params.yaml), as Hugging Face / SPDX licence identifiers. The
# remade dataset is a derivative of its source, so it carries the source's licence.
SOURCE_LICENSES: dict[str, str] = {
    "reasoning_gym": "apache-2.0",
    "gsm8k": "mit",
    "clinifact": "mit",
    "babi": "cc-by-3.0",
}

LICENSE_NAMES: dict[str, str] = {"apache-2.0": "Apache-2.0", "mit": "MIT", "cc-by-3.0": "CC BY 3.0"}

# What the card says about each source (keyed like SOURCE_LICENSES).
SOURCE_DESCRIPTIONS: dict[str, str] = {
    "reasoning_gym": "reasoning-gym (open-thought/reasoning-gym), problems generated offline with "
                     "worked solutions built from each task's metadata",
    "gsm8k": "GSM8K (openai/gsm8k, grade-school math word problems with worked solutions)",
    "clinifact": "CliniFact (clinical claims with abstracts, labelled TRUE / FALSE / NONE)",
    "babi": "bAbI tasks 1-20 v1.2 (facebook, English, 1k)",
}

TASK_CATEGORIES: dict[str, list[str]] = {
    "reasoning_gym": ["question-answering", "text-generation"],
    "gsm8k": ["question-answering", "text-generation"],
    "clinifact": ["text-classification", "question-answering"],
    "babi": ["question-answering"],
}

# One line per REMADE column, for the card (a test checks every column is described).
COLUMN_DESCRIPTIONS: dict[str, str] = {
    "id": "stable example id (source, split, index)",
    "question": "the question to train on: the last accepted rewrite, or the source text",
    "original_question": "the source dataset's question, unchanged",
    "answer": "the worked gold answer, ending in `#### <final_answer>` (never rewritten)",
    "final_answer": "the gold final answer alone",
    "system_prompt": "the system prompt after the last epoch (put it before `question`)",
    "source": "source dataset (and task) of the example",
    "source_index": "row of the example in its source",
    "rewritten": "`question` differs from `original_question`",
    "rewrite_epoch": "epoch of the last accepted rewrite (0 = never rewritten)",
    "rewrite_iterations": "rewrite-and-re-ask iterations of that rewrite",
    "criterion": "the per-sample signal that chose samples for rewriting in this run",
    "teacher": "the engine that wrote this question (`hint`, `openai:<model>`, ...; '' if none)",
    "rewrite_reason": "why the rewrite loop stopped: `correct` (student right afterwards) or "
                      "`max_iters`; '' if not rewritten",
}

METHOD_DESCRIPTIONS: dict[str, str] = {
    "nslora": "neurosymbolic LoRA: LoRA epochs interleaved with TextGrad rewrites of the questions "
              "the student still got wrong",
    "lora": "LoRA only (no symbolic update: the questions are the source's)",
    "prefix": "peft prefix-tuning only (no question rewrites)",
    "two_stage": "one system prompt optimised with TextGrad, then LoRA",
    "lora_sysprompt": "LoRA, then system-prompt refinement instead of question rewrites",
}


def _squash(text: str) -> str:
    return " ".join(str(text).split())


def rewrite_counts(rewrites: list[pd.DataFrame]) -> dict:
    """Count rewrite attempts over the per-epoch REWRITES logs.

    Args:
        rewrites: `rewrites[k-1]` is epoch k's log (schema REWRITES, possibly empty).

    Returns:
        dict with attempted, accepted, rejected (totals over epochs; a sample attempted in two
        epochs counts twice), student_correct_after, rejected_by_reason, accepted_by_outcome
        ({'correct': n, 'max_iters': m}) and per_epoch (a list of {epoch, attempted, accepted,
        rejected}).

    Raises:
        ValueError: a log lacks REWRITES columns, or holds rows of another epoch than its position.
    """
    per_epoch, logs = [], []
    for k, log in enumerate(rewrites, start=1):
        require_columns(log, REWRITES, f"rewrites log of epoch {k}")
        other = sorted(set(log["epoch"].astype(int)) - {k})
        if other:
            raise ValueError(f"rewrites log of epoch {k} holds rows of epoch(s) {other}: pass the "
                             "logs of epochs 1..N in order")
        accepted = int(log["accepted"].astype(bool).sum())
        per_epoch.append({"epoch": k, "attempted": len(log), "accepted": accepted,
                          "rejected": len(log) - accepted})
        logs.append(log)
    every = pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(columns=REWRITES.names)
    ok = every["accepted"].astype(bool)

    def counts(series: pd.Series) -> dict[str, int]:
        return {str(k): int(v) for k, v in series.value_counts().sort_index().items()}

    return {
        "attempted": len(every), "accepted": int(ok.sum()), "rejected": int((~ok).sum()),
        "student_correct_after": int(every["correct_after"].astype(bool).sum()),
        "rejected_by_reason": counts(every.loc[~ok, "reason"].map(_squash)),
        "accepted_by_outcome": counts(every.loc[ok, "reason"].map(_squash)),
        "per_epoch": per_epoch,
    }


def remade_table(final_train: pd.DataFrame, *, criterion: str, teacher: str) -> pd.DataFrame:
    """The REMADE table of `final_train` (an EXAMPLES table after the last symbolic update).

    Args:
        final_train: the last epoch's EXAMPLES table.
        criterion: the run's selection criterion, recorded on every row.
        teacher: the run's teacher, recorded on rewritten rows whose `rewrite_engine` is empty.

    Returns:
        A DataFrame with exactly the columns of REMADE, in `final_train`'s row order.

    Raises:
        ValueError: columns of EXAMPLES are missing.
    """
    require_columns(final_train, EXAMPLES, "final training table")
    df = final_train.reset_index(drop=True)
    question = df["question"].astype(str)
    original = df["original_question"].fillna("").astype(str)
    # Sources that predate the provenance columns may leave original_question empty: the question
    # was then never rewritten, so it is its own source text.
    original = original.where(original != "", question)
    rewritten = question.map(_squash) != original.map(_squash)
    engine = df["rewrite_engine"].fillna("").astype(str)
    out = pd.DataFrame({
        "id": df["id"].astype(str),
        "question": question,
        "original_question": original,
        "answer": df["solution"].astype(str),
        "final_answer": df["final_answer"].astype(str),
        "system_prompt": df["system_prompt"].fillna("").astype(str),
        "source": df["source"].astype(str),
        "source_index": df["source_index"].astype("int64"),
        "rewritten": rewritten.astype(bool),
        "rewrite_epoch": df["rewrite_epoch"].fillna(0).astype("int64"),
        "rewrite_iterations": df["rewrite_iterations"].fillna(0).astype("int64"),
        "criterion": criterion,
        "teacher": engine.where(engine != "", teacher).where(rewritten, ""),
        "rewrite_reason": df["rewrite_reason"].fillna("").astype(str).where(rewritten, ""),
    })
    return out[REMADE.names]


def _size_category(n: int) -> str:
    # Hugging Face's size_categories buckets.
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>10M"


def _source_key(sources: list[str]) -> str:
    keys = sorted({s.split("/")[0] for s in sources})
    return keys[0] if len(keys) == 1 else ""


def _cell(text: object) -> str:
    # A reason such as "teacher_error: 500 | retry" must not break the Markdown table.
    return _squash(str(text)).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_card(table: pd.DataFrame, counts: dict, *, criterion: str, teacher: str, method: str,
                 source_license: str, epochs: int, data_file: str = "data/remade/train.parquet",
                 repo_url: str = "<repo-url>") -> str:
    """The Markdown dataset card (README.md with YAML front matter) of a REMADE table.

    Args:
        table: the REMADE table.
        counts: `rewrite_counts(...)` of the run's logs.
        criterion, teacher, method: how the run chose and rewrote samples.
        source_license: the source's licence identifier (a value of SOURCE_LICENSES).
        epochs: number of epochs of the run.
        data_file: path of the Parquet file in the repository (for the loading instructions).
        repo_url: the git repository's URL (for `dvc get`).

    Returns:
        The card's text.
    """
    n, rewritten = len(table), int(table["rewritten"].sum())
    sources = sorted(table["source"].unique().tolist())
    key = _source_key(sources)
    license_id = source_license.strip().lower()
    front = {
        "license": license_id,
        "task_categories": TASK_CATEGORIES.get(key, ["question-answering"]),
        "language": ["en"],
        "size_categories": [_size_category(n)],
        "pretty_name": f"{', '.join(sources) or 'empty'} remade by nslora ({method}, {criterion})",
        "tags": ["nslora", "neurosymbolic-lora", "textgrad", "synthetic"],
        # Lets `datasets.load_dataset(<folder of this card>)` find the data next to it.
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": data_file.rsplit("/", 1)[-1]}]}],
    }
    license_name = LICENSE_NAMES.get(license_id, source_license)
    engines = sorted(set(table.loc[table["rewritten"], "teacher"]))
    fraction = rewritten / n if n else 0.0
    rejected = sorted(counts["rejected_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---",
        f"# {front['pretty_name']}",
        f"The training set of an nslora run after its last epoch ({n} examples): each question is "
        "either the source's or a rewrite that a teacher LLM wrote because the student model got "
        "it wrong after its numerical learning stalled. Gold answers are the source's, unchanged. "
        "Fine-tune another model on `system_prompt` + `question` -> `answer`.",
        "## Source\n\n"
        f"- Dataset: {SOURCE_DESCRIPTIONS.get(key, 'see the `source` column')}; "
        f"`source` values: {', '.join(f'`{s}`' for s in sources) or '(none)'}.\n"
        f"- Licence: **{license_name}** (`{license_id}`), the source's. The rewritten questions are "
        "derived from it; the terms of the teacher model's provider may also apply to them.",
        "## How it was made\n\n"
        f"- Method: `{method}` — {METHOD_DESCRIPTIONS.get(method, method)}.\n"
        f"- Criterion: `{criterion}` (the per-sample signal ranking the samples after each epoch; "
        "the lowest-ranked ones the student answered wrongly were rewritten).\n"
        f"- Teacher: `{teacher}`" + (f" (rewrites by {', '.join(f'`{e}`' for e in engines)})"
                                     if engines and engines != [teacher] else "") + ".\n"
        f"- Epochs: {epochs}. A rewrite is kept only if it passes the checks (non-empty, length, "
        "every number of the original kept, gold answer not leaked); the student is re-asked after "
        "each rewrite, up to the run's `symbolic.max_iters` times.\n"
        "- Made by `stages/synthesize_dataset.py` (DVC stage `synthesize_dataset`); `dvc.lock` "
        "records the exact code, parameters and inputs.",
        "## Counts\n\n" + _table(("", "count"), [
            ("rows", n),
            ("rewritten (question differs from the source)", rewritten),
            ("fraction rewritten", f"{fraction:.4f}"),
            ("rewrite attempts, all epochs", counts["attempted"]),
            ("accepted", counts["accepted"]),
            ("rejected", counts["rejected"]),
            ("student correct after the rewrite", counts["student_correct_after"]),
        ]) + "\n\nRejected attempts by reason:\n\n"
        + (_table(("reason", "count"), rejected) if rejected else "(none)")
        + "\n\nPer epoch:\n\n"
        + _table(("epoch", "attempted", "accepted", "rejected"),
                 [(e["epoch"], e["attempted"], e["accepted"], e["rejected"])
                  for e in counts["per_epoch"]]),
        "## Columns\n\n" + _table(("column", "type", "meaning"), [
            (f"`{f.name}`", str(f.type), COLUMN_DESCRIPTIONS[f.name]) for f in REMADE]),
        "## Loading\n\n"
        "```python\n"
        "from datasets import load_dataset\n"
        f'ds = load_dataset("parquet", data_files="{data_file}")["train"]\n'
        "```\n\n"
        "```bash\n"
        f"dvc get {repo_url} {data_file}        # without cloning\n"
        f"dvc pull {data_file}                  # inside a clone of the repository\n"
        "```",
    ]
    return "\n\n".join(sections) + "\n"


def synthesize(final_train: pd.DataFrame, rewrites: list[pd.DataFrame], *, criterion: str,
               teacher: str, method: str, source_license: str) -> tuple[pd.DataFrame, str]:
    """The remade dataset and its card.

    Args:
        final_train: the EXAMPLES table after the last epoch's symbolic update
            (`data/train/epoch_N.parquet`).
        rewrites: the REWRITES logs of epochs 1..N in order (`data/rewrites/epoch_k.parquet`).
        criterion: the run's criterion (params `criteria`).
        teacher: the run's teacher engine and model, e.g. 'openai:gpt-4o' or 'hint'.
        method: params `method`.
        source_license: licence identifier of the source, `SOURCE_LICENSES[params.data.source]`.

    Returns:
        (table, card): a DataFrame with the columns of `nslora.schemas.REMADE` and the Markdown card.

    Raises:
        ValueError: missing columns; a log of the wrong epoch; a log naming ids that are not in
            `final_train`; rows rewritten in a later epoch than the logs cover; an empty licence.
    """
    if not source_license.strip():
        raise ValueError("source_license: empty; the card must state the source's licence")
    table = remade_table(final_train, criterion=criterion, teacher=teacher)
    counts = rewrite_counts(rewrites)
    known = set(table["id"])
    for k, log in enumerate(rewrites, start=1):
        stray = sorted(set(log["id"].astype(str)) - known)
        if stray:
            raise ValueError(f"rewrites log of epoch {k} names ids not in the final training table "
                             f"(inputs of different runs?): {stray[:5]}")
    latest = int(table["rewrite_epoch"].max()) if len(table) else 0
    if latest > len(rewrites):
        raise ValueError(f"final training table has rewrites of epoch {latest}, but only "
                         f"{len(rewrites)} epoch log(s) were given")
    card = dataset_card(table, counts, criterion=criterion, teacher=teacher, method=method,
                        source_license=source_license, epochs=len(rewrites))
    return table, card
