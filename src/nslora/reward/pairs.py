"""Preference pairs from one run's criteria logs: for each epoch, two samples whose criterion scores
differ; the "plus" side is the one with the lower score (the side sent to symbolic updates)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Pair columns; "plus" = lower criterion score = the side sent to symbolic updates.
PAIR_COLUMNS = ["epoch", "criterion", "id_plus", "id_minus", "score_plus", "score_minus", "text_plus", "text_minus"]
# All pairs of an epoch are listed (and subsampled exactly) up to this many; beyond, pairs are drawn
# at random, which stays cheap for GSM8K-sized runs (7473 eligible samples = 28M pairs).
ENUMERATE_LIMIT = 1_000_000


def sample_text(question: str, solution: str) -> str:
    """The text a reward is computed on: the question as trained that epoch, plus its gold solution."""
    return f"Q: {question}\nA: {solution}"



def _epoch_samples(selection: pd.DataFrame, train: pd.DataFrame,
                   eligible_only: bool = True) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(epoch, ids, scores, texts) of the (eligible,) finitely scored samples of one criteria log."""
    rows = selection[np.isfinite(selection["score"].astype(float))]
    if eligible_only:
        rows = rows[rows["eligible"].astype(bool)]
    epochs = selection["epoch"].unique()
    if len(epochs) != 1:
        raise ValueError(f"a criteria log must hold one epoch, got epochs {sorted(epochs.tolist())}")
    rows = rows.sort_values("id", kind="stable")  # row order of the file must not change the draw
    by_id = train.set_index("id")
    missing = sorted(set(rows["id"]) - set(by_id.index))
    if missing:
        raise ValueError(f"epoch {epochs[0]}: {len(missing)} selected sample(s) are not in the examples "
                         f"table that epoch trained on (e.g. {missing[0]!r}); pass data/train/epoch_{{k-1}}")
    texts = [sample_text(q, s) for q, s in zip(by_id.loc[rows["id"], "question"], by_id.loc[rows["id"], "solution"])]
    return int(epochs[0]), rows["id"].astype(str).to_numpy(), rows["score"].astype(float).to_numpy(), np.array(texts, dtype=object)


class TooFewPairs(ValueError):
    """The criteria logs hold too little to train on (a small or saturated run): not a crash."""


def _too_few_pairs(criterion: str, eligible: dict[int, int]) -> ValueError:
    knob = {"loss_ratio": "symbolic.loss_ratio_threshold (which samples count as eligible)",
            "grad_norm": "the run's gradient norms (samples without answer tokens are ineligible)",
            "random": "nothing (random is the control: it carries no signal to learn)",
            "reward": "reward.path (scores of the previous reward model)"}.get(criterion, "the criterion")
    return TooFewPairs(
        f"reward model: cannot form preference pairs: the criteria logs (criteria={criterion}) have "
        f"{eligible} eligible samples with distinct scores per epoch; a pair needs two in one epoch. "
        f"Eligibility is set by the criterion: check {knob}; symbolic.ratio only sets how many of the "
        "eligible ones are selected. Train on a run with more epochs or samples, or another criterion.")


def preference_pairs(selections: Sequence[pd.DataFrame], trains: Sequence[pd.DataFrame], n_pairs: int,
                     seed: int, eligible_only: bool = True) -> pd.DataFrame:
    """Draw preference pairs from a run's per-epoch criteria logs.

    Both samples of a pair come from one epoch's ranking (scores of different epochs are not
    comparable) and may be different questions. The "plus" side has the lower criterion score, i.e.
    is the side the criterion sends to symbolic updates; ties are never paired. Pairs are drawn
    uniformly without replacement from all valid pairs of all epochs (all of them if there are at
    most `n_pairs`).

    Args:
        selections: SELECTION tables, one per epoch; rows with a finite score are used (eligible ones
            only, unless eligible_only=False).
        trains: the EXAMPLES table each of those epochs trained on (same order), for the question as
            it was that epoch and its gold solution.
        n_pairs: how many pairs to draw at most.
        seed: seed of the draw.
        eligible_only: pair only eligible samples (the criterion's ranking). False also pairs
            ineligible samples that have a finite score by that score (loss_ratio: ratios beyond
            the threshold, i.e. samples numerical learning clearly moved).

    Returns:
        DataFrame with columns PAIR_COLUMNS (score_plus < score_minus on every row).

    Raises:
        ValueError: lists of different lengths, a log spanning several epochs, ids missing from the
            examples table, or no epoch with two eligible samples of distinct scores (the message
            names the criterion and the knob that decides eligibility).
    """
    if len(selections) != len(trains):
        raise ValueError(f"got {len(selections)} criteria logs but {len(trains)} examples tables")
    if not selections:
        raise ValueError("reward model: no criteria logs given")
    rng = np.random.default_rng(seed)
    epochs = [_epoch_samples(s, t, eligible_only) for s, t in zip(selections, trains)]
    criteria = [",".join(sorted(map(str, s["criterion"].unique()))) for s in selections]
    sizes = np.array([len(ids) for _, ids, _, _ in epochs], dtype=np.int64)
    counts = sizes * (sizes - 1) // 2
    total = int(counts.sum())
    chosen: list[tuple[int, int, int]] = []  # (epoch index, i, j) with i < j
    if total <= ENUMERATE_LIMIT:
        for e, (_, _, scores, _) in enumerate(epochs):
            i, j = np.triu_indices(len(scores), k=1)
            keep = scores[i] != scores[j]
            chosen.extend(zip([e] * int(keep.sum()), i[keep].tolist(), j[keep].tolist()))
        if len(chosen) > n_pairs:
            picks = np.sort(rng.choice(len(chosen), size=n_pairs, replace=False))
            chosen = [chosen[k] for k in picks]
    else:
        # Rejection sampling: an epoch with probability proportional to its pairs, then two of its
        # samples; self-pairs, ties and repeats are redrawn. Uniform over valid pairs, never listing them.
        seen: set[tuple[int, int, int]] = set()
        weights = counts / total
        for _ in range(100):  # bounded: scores with many ties could otherwise loop for long
            e_draw = rng.choice(len(epochs), size=4 * n_pairs, p=weights)
            a = (rng.random(4 * n_pairs) * sizes[e_draw]).astype(np.int64)
            b = (rng.random(4 * n_pairs) * sizes[e_draw]).astype(np.int64)
            for e, x, y in zip(e_draw.tolist(), a.tolist(), b.tolist()):
                key = (e, min(x, y), max(x, y))
                if x != y and key not in seen and epochs[e][2][x] != epochs[e][2][y]:
                    seen.add(key)
                    chosen.append(key)
                    if len(chosen) == n_pairs:
                        break
            if len(chosen) == n_pairs:
                break
    if not chosen:
        criterion = ",".join(sorted(set(criteria))) or "?"
        distinct = {ep: int(pd.Series(sc).nunique()) for ep, _, sc, _ in epochs}
        raise _too_few_pairs(criterion, distinct)
    rows = []
    for e, i, j in chosen:
        epoch, ids, scores, texts = epochs[e]
        plus, minus = (i, j) if scores[i] < scores[j] else (j, i)  # lower score = symbolic side = plus
        rows.append((epoch, criteria[e], ids[plus], ids[minus], scores[plus], scores[minus], texts[plus], texts[minus]))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def heldout_ids(ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The ids held out from training: a seeded hash of the id, so the split does not depend on which
    pairs were drawn, and a sample is on the same side in every epoch (rewritten or not)."""
    held = set()
    for sample_id in set(map(str, ids)):
        digest = hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < fraction:
            held.add(sample_id)
    return held


def split_pairs(pairs: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, set[str]]:
    """Split pairs by their samples: (train mask, held-out mask, held-out ids). A pair is held out
    when both its samples are, trains when neither is; pairs mixing the two are in neither."""
    held = heldout_ids(pd.concat([pairs["id_plus"], pairs["id_minus"]]), fraction, seed)
    held_plus = pairs["id_plus"].astype(str).isin(held).to_numpy()
    held_minus = pairs["id_minus"].astype(str).isin(held).to_numpy()
    return ~held_plus & ~held_minus, held_plus & held_minus, held


def pairs_hash(pairs: pd.DataFrame) -> str:
    """A content hash of the training data (pairs and their texts), for the artifact's meta.json."""
    payload = json.dumps(pairs[PAIR_COLUMNS].astype(str).to_numpy().tolist(), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def embed_pair_texts(pairs: pd.DataFrame, embed) -> dict[str, np.ndarray]:
    """Embed every distinct text of `pairs` once. Returns {text: vector}."""
    texts = list(dict.fromkeys(pairs["text_plus"].tolist() + pairs["text_minus"].tolist()))
    vectors = embed(texts)
    return dict(zip(texts, vectors))
