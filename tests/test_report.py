"""The comparison report: runs from `dvc exp show --json`, the paired bootstrap against LoRA, the
table, and the experiment grid. The real queue → report path runs in test_pipeline.py."""

import numpy as np
import pandas as pd
import pytest

from nslora.report import (differences_from_lora, experiment_grid, markdown_table, merge_earlier, paired_bootstrap,
                           read_report_runs, runs_from_exp_show, summarize_runs, write_report_runs)


def test_paired_bootstrap_bounds_and_determinism():
    rng = np.random.default_rng(1)
    same = rng.integers(0, 2, (3, 50))
    assert paired_bootstrap(same, same, 500) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(np.ones((3, 50)), np.zeros((3, 50)), 500) == (1.0, 1.0, 1.0)
    ours = (rng.random((3, 200)) < 0.6).astype(int)
    theirs = (rng.random((3, 200)) < 0.4).astype(int)
    delta, low, high = paired_bootstrap(ours, theirs, 2000)
    assert low < delta < high and 0 < low and high < 0.4
    assert paired_bootstrap(ours, theirs, 2000) == (delta, low, high)
    _, small_low, small_high = paired_bootstrap(ours[:, :40], theirs[:, :40], 2000)
    assert small_high - small_low > high - low  # fewer questions, wider interval
    with pytest.raises(ValueError, match="shapes"):
        paired_bootstrap(ours, theirs[:, :10])


def _exp(name, method, seed, accuracy, criteria="loss_ratio", engine="local", sysprompt=False,
         teacher="embedded:qwen2.5-coder-1.5b", precision="bfloat16"):
    params = {"method": method, "criteria": criteria, "train": {"seed": seed},
              "teacher": {"engine": engine, "model": teacher}, "symbolic": {"update_system_prompt": sysprompt}}
    metrics = {"metrics/eval.json": {"data": {"pretrained_accuracy": 0.1, "final_accuracy": accuracy,
                                              "final_epoch": 2, "n": 4}},
               "metrics/eval/epoch_2.json": {"data": {"accuracy": accuracy, "evaluated": True}},
               "metrics/train/epoch_2.json": {"data": {"precision": precision, "seconds": 1.0}},
               "metrics/symbolic/epoch_1.json": {"data": {"selected": 3, "accepted": 1, "seconds": 5.0,
                                                          "teacher": {"calls": 7},
                                                          "proposals": {"made": 2, "tagged": 1}}}}
    return {"name": name, "revs": [{"rev": f"rev-{name}", "name": name,
                                    "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}]}


def test_report_rows_differences_and_table():
    exp_show = [{"rev": "workspace", "experiments": [
        _exp("lora-s0", "lora", 0, 0.5), _exp("lora-s1", "lora", 1, 0.25),
        _exp("ns-s0", "nslora", 0, 0.75), _exp("ns-s1", "nslora", 1, 0.5),
        _exp("nssp-s0", "nslora", 0, 0.5, sysprompt=True),
        _exp("prefix-s0", "prefix", 0, 0.25), _exp("two-stage-s0", "two_stage", 0, 0.75),
        _exp("ns-small-s0", "nslora", 0, 0.25, teacher="embedded:smollm2"),
        _exp("ns-hint-s0", "nslora", 0, 0.5, engine="hint"),
        {"name": "failed", "revs": [{"rev": "x", "data": {"metrics": {}}}]},
    ]}]
    runs = runs_from_exp_show(exp_show)
    assert len(runs) == 9 and set(runs["method"]) == {"lora", "nslora", "nslora_sysprompt", "prefix", "two_stage"}
    assert runs.loc[runs["method"] == "prefix", "criteria"].item() == "-"  # numerical-only: no criterion
    # Rows are told apart by their teacher, not only by the engine kind.
    engines = runs.set_index("experiment")["engine"]
    assert engines["ns-s0"] == "local:embedded:qwen2.5-coder-1.5b" and engines["lora-s0"] == "-"
    assert engines["ns-small-s0"] == "local:embedded:smollm2" and engines["ns-hint-s0"] == "hint"
    assert runs.set_index("experiment").loc["ns-s0", ["proposals", "tagged"]].tolist() == [2, 1]
    correct = {
        "rev-lora-s0": [1, 1, 0, 0], "rev-lora-s1": [1, 0, 0, 0],
        "rev-ns-s0": [1, 1, 1, 0], "rev-ns-s1": [1, 1, 0, 0], "rev-nssp-s0": [0, 1, 1, 0],
        "rev-ns-small-s0": [1, 0, 0, 0], "rev-ns-hint-s0": [1, 1, 0, 0], "rev-two-stage-s0": [1, 1, 1, 1],
    }
    ids = ["q3", "q1", "q2", "q0"]  # not sorted: pairing is by question id, not by position
    by_rev = {rev: pd.Series(np.array(v, bool), index=ids) for rev, v in correct.items()}
    deltas = differences_from_lora(runs, by_rev, resamples=300)
    deltas = deltas[deltas["engine"] == "local:embedded:qwen2.5-coder-1.5b"].set_index("method")
    assert deltas.loc["nslora", "delta"] == pytest.approx(0.25) and deltas.loc["nslora", "paired_seeds"] == 2
    assert deltas.loc["nslora_sysprompt", "delta"] == pytest.approx(0.0)
    assert "prefix" not in deltas.index
    # Two-stage trains the same LoRA from another prompt: compared with LoRA too.
    two_stage = differences_from_lora(runs, by_rev, resamples=300).set_index("method").loc["two_stage"]
    assert two_stage["delta"] == pytest.approx(0.5) and two_stage["paired_seeds"] == 1
    table = markdown_table(summarize_runs(runs), deltas.reset_index())
    assert "| NS-LoRA | loss_ratio | local:embedded:qwen2.5-coder-1.5b | 2 | 62.5 ± 17.7 | +25.0 [" in table
    assert "| NS-LoRA | loss_ratio | local:embedded:smollm2 | 1 | 25.0 ± 0.0 |" in table
    assert "| NS-LoRA + system prompt | loss_ratio | local:embedded:qwen2.5-coder-1.5b | 1 |" in table
    assert "| Pre-trained | - | - | - | 10.0 |" in table

    by_rev["rev-ns-s1"] = by_rev["rev-ns-s1"].iloc[:3]
    with pytest.raises(ValueError, match="other questions"):
        differences_from_lora(runs, by_rev, resamples=10)


def test_grid_variants():
    grid = experiment_grid(["nslora", "nslora_sysprompt", "lora"], ["loss_ratio", "random"], ["local", "hint"], [0, 1])
    names = [g["name"] for g in grid]
    assert len(names) == len(set(names)) == 2 * 2 * 2 + 1 * 1 * 2 + 2
    sysprompt = [g["set"] for g in grid if g["name"].startswith("nslora-sysprompt")]
    assert all(s["method"] == "nslora" and s["symbolic.update_system_prompt"] == "true"
               and s["teacher.engine"] == "local" for s in sysprompt)
    assert sum(g["set"]["symbolic.update_system_prompt"] == "true" for g in grid) == len(sysprompt) == 2
    two_stage = experiment_grid(["two_stage"], ["random"], ["hint", "local"], [0])
    assert [g["set"]["teacher.engine"] for g in two_stage] == ["local"]  # its prompt needs a teacher


def test_earlier_report_runs_join_new_ones(tmp_path):
    """Runs made in another workspace come back from a committed report (runs.csv + correctness.csv)
    and pair with new runs exactly as if they had been in one `dvc exp show`."""
    ids = ["q1", "q0", "q2", "q3"]
    by_rev = {f"rev-{name}": pd.Series(np.array(v, bool), index=ids) for name, v in
              {"lora-s0": [1, 0, 0, 0], "ns-s0": [1, 1, 0, 0], "lora-s1": [1, 1, 0, 0], "ns-s1": [1, 1, 1, 0]}.items()}
    everything = runs_from_exp_show([{"experiments": [
        _exp("lora-s0", "lora", 0, 0.25), _exp("ns-s0", "nslora", 0, 0.5),
        _exp("lora-s1", "lora", 1, 0.5), _exp("ns-s1", "nslora", 1, 0.75)]}])
    earlier = runs_from_exp_show([{"experiments": [_exp("lora-s0", "lora", 0, 0.25), _exp("ns-s0", "nslora", 0, 0.5),
                                                   _exp("ns-s1", "nslora", 1, 0.1)]}])
    write_report_runs(earlier, by_rev, tmp_path / "earlier")
    assert (tmp_path / "earlier" / "correctness.csv").read_text().splitlines()[:2] == [
        "experiment,rev,id,correct", "lora-s0,rev-lora-s0,q0,0"]
    now = runs_from_exp_show([{"experiments": [_exp("lora-s1", "lora", 1, 0.5), _exp("ns-s1", "nslora", 1, 0.75)]}])
    merged, correct = merge_earlier(now, {k: by_rev[k] for k in ("rev-lora-s1", "rev-ns-s1")},
                                    *read_report_runs(tmp_path / "earlier"))
    # ns-s1 is in both: the current run wins; the earlier report adds seed 0.
    assert merged["experiment"].tolist() == everything["experiment"].tolist()
    assert merged.set_index("experiment").loc["ns-s1", "accuracy"] == 0.75
    pd.testing.assert_frame_equal(differences_from_lora(merged, correct, 300),
                                  differences_from_lora(everything, by_rev, 300))
    # Written again, the merged runs give the same bytes as the runs that were never split.
    write_report_runs(merged, correct, tmp_path / "merged")
    write_report_runs(everything, by_rev, tmp_path / "whole")
    for name in ("runs.csv", "correctness.csv"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # Runs of a machine where `auto` meant another precision do not join.
    fp32 = runs_from_exp_show([{"experiments": [_exp("lora-s1", "lora", 1, 0.5, precision="float32")]}])
    with pytest.raises(ValueError, match=r"trained in \['bfloat16'\], these in \['float32'\]"):
        merge_earlier(fp32, {}, *read_report_runs(tmp_path / "earlier"))
    (tmp_path / "earlier" / "correctness.csv").write_text("experiment,rev,id\n")
    with pytest.raises(ValueError, match=r"correctness.csv: columns \['correct'\] missing"):
        read_report_runs(tmp_path / "earlier")
    with pytest.raises(ValueError, match="runs.csv: missing"):
        read_report_runs(tmp_path / "nowhere")
