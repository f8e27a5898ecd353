"""Switching criteria, selection and the epoch trigger."""

from __future__ import annotations

import pandas as pd
import pytest

from nslora.config import SymbolicConfig
from nslora.selection.criteria import build_selection, criterion_scores, loss_change, select, should_trigger
from nslora.schemas import SELECTION, to_table
from nslora.selection.student import Student


def stats(losses, grads, epoch=1):
    return pd.DataFrame({"id": [f"s{i}" for i in range(len(losses))], "epoch": epoch, "batch_index": 0,
                         "loss": losses, "grad_norm": grads, "answer_tokens": 5, "tokens": 20})


CFG = SymbolicConfig(ratio=0.25, loss_ratio_threshold=0.5)


def test_grad_norm_selects_the_smallest_gradients():
    now = stats([1.0] * 8, [0.9, 0.1, 0.5, 0.05, 2.0, 0.3, 0.7, 0.2])
    picked = select(criterion_scores("grad_norm", now, None, CFG, seed=0, epoch=1), CFG.ratio)
    assert sorted(picked.index[picked["selected"]]) == ["s1", "s3"]
    assert picked.loc["s3", "rank"] == 0 and picked.loc["s4", "rank"] == 7


def test_loss_ratio_selects_stalled_samples_within_threshold():
    before = stats([2.0, 2.0, 2.0, 2.0, 0.0, 2.0, 2.0, 2.0], [1.0] * 8, epoch=0)
    now = stats([0.2, 1.9, 2.1, 0.5, 0.1, 1.2, 3.5, 1.8], [1.0] * 8)
    scores = criterion_scores("loss_ratio", now, before, CFG, seed=0, epoch=1)
    # |ratio|: s0 .9, s1 .05, s2 .05, s3 .75, s4 undefined (L_0 = 0), s5 .4, s6 .75, s7 .1
    assert scores["eligible"].tolist() == [False, True, True, False, False, True, False, True]
    picked = select(scores, CFG.ratio)
    assert sorted(picked.index[picked["selected"]]) == ["s1", "s2"]  # tie broken by id
    with pytest.raises(ValueError, match="previous epoch"):
        criterion_scores("loss_ratio", now, None, CFG, seed=0, epoch=1)


def test_random_is_seeded_and_independent_of_row_order():
    now = stats([1.0] * 20, [1.0] * 20)
    a = criterion_scores("random", now, None, CFG, seed=3, epoch=2)
    b = criterion_scores("random", now.iloc[::-1], None, CFG, seed=3, epoch=2)
    assert a["score"].equals(b["score"].loc[a.index])
    assert not a["score"].equals(criterion_scores("random", now, None, CFG, seed=4, epoch=2)["score"])


def test_reward_selects_the_highest_reward():
    now = stats([1.0] * 4, [1.0] * 4)
    reward = pd.Series([0.1, 0.9, 0.5, 0.2], index=["s0", "s1", "s2", "s3"])
    picked = select(criterion_scores("reward", now, None, SymbolicConfig(ratio=0.25), 0, 1, reward), 0.25)
    assert picked.index[picked["selected"]].tolist() == ["s1"]


@pytest.mark.parametrize("trigger, epoch, change, expected", [
    ("schedule", 1, -0.5, True),
    ("schedule", 2, -0.5, False),   # every=2 from start_epoch=1
    ("schedule", 3, -0.5, True),
    ("saturation", 2, -0.5, False),
    ("saturation", 2, -0.01, True),
    ("schedule_and_saturation", 3, -0.5, False),
    ("schedule_and_saturation", 3, -0.01, True),
    ("never", 1, -0.01, False),
])
def test_trigger(trigger, epoch, change, expected):
    cfg = SymbolicConfig(trigger=trigger, start_epoch=1, every=2, saturation_threshold=0.05)
    assert should_trigger(epoch, cfg, change)[0] is expected


def test_loss_change():
    assert loss_change(stats([1.0, 1.0], [1, 1]), stats([2.0, 2.0], [1, 1], 0)) == pytest.approx(-0.5)
    assert loss_change(stats([1.0], [1]), None) is None


def test_build_selection_asks_the_student_only_when_triggered(tiny_model_dir, examples):
    train = examples(8)
    now = stats([1.0] * 8, [0.9, 0.1, 0.5, 0.05, 2.0, 0.3, 0.7, 0.2])
    now["id"] = train["id"]
    calls = []

    def make_student():
        calls.append(1)
        return Student(tiny_model_dir, None, precision="fp32")

    cfg = SymbolicConfig(ratio=0.25, student_max_new_tokens=4)
    selection, metrics = build_selection(train, now, None, "grad_norm", cfg, 0, 1, make_student)
    to_table(selection, SELECTION)
    assert metrics["triggered"] and metrics["selected"] == 2 and len(calls) == 1
    asked = selection[selection["selected"]]
    assert sorted(asked["id"]) == ["ex-train-0001", "ex-train-0003"]
    assert metrics["incorrect"] == (~asked["correct"]).sum()

    off = SymbolicConfig(ratio=0.25, trigger="never")
    selection, metrics = build_selection(train, now, None, "grad_norm", off, 0, 1, make_student)
    assert not metrics["triggered"] and not selection["selected"].any() and len(calls) == 1
