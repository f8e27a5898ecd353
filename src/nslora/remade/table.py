"""The remade table (schema `nslora.schemas.REMADE`) from the last epoch's training table and the
REWRITES logs, checked against each other."""

from __future__ import annotations

import pandas as pd

from nslora.answers import squash_spaces
from nslora.schemas import EXAMPLES, REMADE, REWRITES, require_columns

from .card import dataset_card


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
        "rejected_by_reason": counts(every.loc[~ok, "reason"].map(squash_spaces)),
        "accepted_by_outcome": counts(every.loc[ok, "reason"].map(squash_spaces)),
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
    rewritten = question.map(squash_spaces) != original.map(squash_spaces)
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
