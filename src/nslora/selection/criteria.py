"""Which samples get a symbolic update: per-sample criteria, selection and the epoch trigger.

Every criterion gives a score where *lower* means "numerical learning is not helping this sample":
  random      a seeded uniform draw (the control),
  grad_norm   the sample's gradient norm over the LoRA parameters (small = stalled),
  loss_ratio  |(L_t - L_t-1) / L_t-1|, only for samples within `loss_ratio_threshold` of zero,
  reward      minus a reward model's score (high reward = looks like samples that needed rewrites).
The lowest `symbolic.ratio` of eligible samples are selected.

    scores = criterion_scores("grad_norm", stats_now, stats_before, cfg, seed=0, epoch=1)
    selection = select(scores, cfg.ratio)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..config import SymbolicConfig
from ..schemas import system_prompt_of


def criterion_scores(criterion: str, stats: pd.DataFrame, previous: pd.DataFrame | None,
                     cfg: SymbolicConfig, seed: int, epoch: int,
                     reward: pd.Series | None = None) -> pd.DataFrame:
    """Score every sample of `stats` (this epoch's SAMPLE_STATS).

    Args:
        previous: the previous epoch's statistics (epoch 0 = the initial model's losses); needed by
            loss_ratio.
        reward: reward-model scores indexed by sample id; needed by reward.

    Returns:
        DataFrame indexed by id with columns score (float) and eligible (bool).

    Raises:
        ValueError: unknown criterion, or the input it needs is missing.
    """
    ids = stats["id"].astype(str)
    if criterion == "random":
        # Seeded by (seed, epoch) and ordered by id, so the draw does not depend on row order.
        rng = np.random.default_rng([seed, epoch])
        order = np.argsort(ids.to_numpy())
        draws = np.empty(len(ids))
        draws[order] = rng.random(len(ids))
        score = pd.Series(draws, index=ids)
        eligible = pd.Series(True, index=ids)
    elif criterion == "grad_norm":
        score = pd.Series(stats["grad_norm"].to_numpy(), index=ids)
        eligible = score.notna() & (stats["answer_tokens"].to_numpy() > 0)
    elif criterion == "loss_ratio":
        if previous is None:
            raise ValueError("criteria=loss_ratio needs the previous epoch's per-sample losses")
        before = previous.set_index(previous["id"].astype(str))["loss"].reindex(ids)
        now = pd.Series(stats["loss"].to_numpy(), index=ids)
        ratio = (now - before) / before
        score = ratio.abs()
        eligible = score.notna() & (score <= cfg.loss_ratio_threshold) & (before > 0)
    elif criterion == "reward":
        if reward is None:
            raise ValueError("criteria=reward needs reward-model scores (the reward_model stage)")
        score = -reward.reindex(ids).astype(float)
        eligible = score.notna()
    else:
        raise ValueError(f"criteria: unknown criterion {criterion!r}")
    return pd.DataFrame({"score": score.astype(float), "eligible": eligible.astype(bool)})


def select(scores: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """Rank eligible samples by score (ties broken by id) and select the lowest `ratio` fraction of
    all samples (at least one when any is eligible). Adds columns rank (-1 = ineligible), selected."""
    frame = scores.copy()
    frame["rank"] = -1
    eligible = frame[frame["eligible"]].reset_index().sort_values(["score", "id"], kind="stable")
    frame.loc[eligible["id"], "rank"] = np.arange(len(eligible))
    quota = min(len(eligible), max(1, math.ceil(ratio * len(frame)))) if len(eligible) else 0
    frame["selected"] = (frame["rank"] >= 0) & (frame["rank"] < quota)
    return frame


def loss_change(stats: pd.DataFrame, previous: pd.DataFrame | None) -> float | None:
    """Relative change of the mean training loss since the previous epoch (None without one)."""
    if previous is None or previous["loss"].isna().all():
        return None
    before, now = previous["loss"].mean(), stats["loss"].mean()
    return float((now - before) / before) if before > 0 else None


def should_trigger(epoch: int, cfg: SymbolicConfig, change: float | None) -> tuple[bool, str]:
    """Whether epoch `epoch` gets symbolic updates, and why (for the metrics)."""
    on_schedule = epoch >= cfg.start_epoch and (epoch - cfg.start_epoch) % cfg.every == 0
    saturated = change is not None and -change < cfg.saturation_threshold
    if cfg.trigger == "never":
        return False, "trigger=never"
    if cfg.trigger == "schedule":
        return on_schedule, "on schedule" if on_schedule else "off schedule"
    if cfg.trigger == "saturation":
        ok = saturated and epoch >= cfg.start_epoch
        return ok, "loss saturated" if ok else "still learning"
    ok = on_schedule and saturated
    return ok, "on schedule and saturated" if ok else ("off schedule" if not on_schedule else "still learning")


def build_selection(train: pd.DataFrame, stats: pd.DataFrame, previous: pd.DataFrame | None,
                    criterion: str, cfg: SymbolicConfig, seed: int, epoch: int, make_student=None,
                    reward: pd.Series | None = None) -> tuple[pd.DataFrame, dict]:
    """Score, select and (when the epoch is triggered) ask the student the selected questions.

    Args:
        train: the EXAMPLES table epoch `epoch` trained on (its current questions are asked).
        make_student: returns a `Student` with this epoch's adapter; called only when a question is
            asked (an untriggered epoch loads no model).

    Returns:
        (selection, metrics): a schemas.SELECTION table over all samples, and counts for
        metrics/selection/epoch_k.json.
    """
    from ..answers import flexible_extract, is_correct, is_numeric

    change = loss_change(stats, previous)
    triggered, why = should_trigger(epoch, cfg, change)
    frame = select(criterion_scores(criterion, stats, previous, cfg, seed, epoch, reward), cfg.ratio)
    frame = frame.reset_index().rename(columns={"index": "id"})
    frame.insert(1, "epoch", epoch)
    frame.insert(2, "criterion", criterion)
    frame["student_output"], frame["student_answer"], frame["correct"] = "", "", False
    if not triggered:
        frame["selected"] = False
    asked = frame[frame["selected"]]
    if len(asked):
        rows = train.set_index("id").loc[asked["id"]]
        prompt = system_prompt_of(train)
        outputs = make_student().answer(prompt, rows["question"].tolist(), cfg.student_max_new_tokens, progress=True)
        extracted = [flexible_extract(o, is_numeric(a)) for o, a in zip(outputs, rows["final_answer"])]
        frame.loc[asked.index, "student_output"] = outputs
        frame.loc[asked.index, "student_answer"] = extracted
        frame.loc[asked.index, "correct"] = [is_correct(e, a) for e, a in zip(extracted, rows["final_answer"])]
    metrics = {
        "epoch": epoch, "criterion": criterion, "triggered": triggered, "trigger_reason": why,
        "loss_change": None if change is None else round(change, 6),
        "eligible": int(frame["eligible"].sum()), "selected": int(frame["selected"].sum()),
        "incorrect": int((frame["selected"] & ~frame["correct"]).sum()),
    }
    return frame.sort_values("id").reset_index(drop=True), metrics
