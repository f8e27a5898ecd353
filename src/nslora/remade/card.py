"""The remade dataset's card: Hugging Face style Markdown with YAML front matter (licence,
sizes, task categories), what each column holds, and how the set was made."""

from __future__ import annotations

import pandas as pd
import yaml

from nslora.methods import METHODS
from nslora.answers import squash_spaces
from nslora.schemas import REMADE

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
    return squash_spaces(str(text)).replace("|", "\\|")


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
        f"- Method: `{method}` — {METHODS[method].description if method in METHODS else method}.\n"
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
