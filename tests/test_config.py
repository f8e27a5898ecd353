"""params.yaml loads into frozen dataclasses; bad keys and types fail naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT
from nslora.config import SECTIONS, ParamsError, launcher_processes, parse_params
from nslora_cli.main import cli
from nslora_cli.params_file import load_params


def real_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_real_params_yaml_loads_and_every_key_has_help():
    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "embedded:smollm2"
    assert params.last_epoch == len(params.epochs) >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    # Every key of the real file is a declared field (no key silently ignored).
    for section, keys in real_params().items():
        if section in SECTIONS:
            assert set(keys) <= {f.name for f in dataclasses.fields(SECTIONS[section])}


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["train"].update(learning_rate=1e-4), "train.learning_rate: unknown key"),
    (lambda p: p["train"].update(lr="fast"), "train.lr: got 'fast' (str), expected float"),
    (lambda p: p["train"].update(batch_size=8.5), "train.batch_size: got 8.5"),
    (lambda p: p["model"].update(precision="fp8"), "model.precision: got 'fp8'"),
    (lambda p: p.update(optimiser={}), "optimiser: unknown params section"),
    (lambda p: p["epochs"].update({"3": {"prev": 1}}), "epochs.3.prev: is 1, must be 2"),
    (lambda p: p["epochs"].pop("1"), "epochs: keys must be 1..1"),
    (lambda p: p["epochs"]["1"].update(eval=True), "epochs.1.eval: unknown key"),
    # Value ranges: ratios, sizes, learning rates, probabilities, timeouts.
    (lambda p: p["symbolic"].update(ratio=0), "symbolic.ratio: got 0.0, must be within (0, 1]"),
    (lambda p: p["symbolic"].update(ratio=1.5), "symbolic.ratio: got 1.5, must be within (0, 1]"),
    (lambda p: p["train"].update(batch_size=0), "train.batch_size: got 0, must be >= 1"),
    (lambda p: p["data"].update(train_size=-3), "data.train_size: got -3, must be >= 1"),
    (lambda p: p["train"].update(lr=0), "train.lr: got 0.0, must be > 0"),
    (lambda p: p["lora"].update(dropout=1.0), "lora.dropout: got 1.0, must be within [0, 1)"),
    (lambda p: p["teacher"].update(timeout=0), "teacher.timeout: got 0.0, must be > 0"),
    (lambda p: p["teacher"].update(concurrency=0), "teacher.concurrency: got 0, must be >= 1"),
    (lambda p: p["eval"].update(limit=0), "eval.limit: got 0, must be >= 1"),
    (lambda p: p["reward"].update(holdout_fraction=1), "reward.holdout_fraction: got 1.0, must be within (0, 1)"),
    (lambda p: p.update(criteria="reward"), "reward.path: criteria=reward ranks samples with a published reward model"),
    # The launcher reaches the shell: a program and options, nothing the shell interprets.
    (lambda p: p["train"].update(launcher="python; rm -rf ~"), "train.launcher: got 'python; rm -rf ~', must be a launcher"),
    (lambda p: p["train"].update(launcher="accelerate launch $(id)"), "train.launcher: got 'accelerate launch $(id)'"),
    (lambda p: p["train"].update(launcher="bash -c"), "train.launcher: got 'bash -c'"),
    # Launches that would not be the tested data parallelism.
    (lambda p: p["train"].update(launcher="accelerate launch --use_fsdp --num_processes 2"),
     "train.launcher: --use_fsdp is not supported"),
    (lambda p: p["train"].update(launcher="accelerate launch --use_deepspeed --zero_stage=3"),
     "train.launcher: --use_deepspeed is not supported"),
    (lambda p: p["train"].update(launcher="accelerate launch --cpu --num_processes=2"),
     "runs ONE process: accelerate's --cpu launch ignores --num_processes"),
    (lambda p: p["train"].update(collective_timeout=0), "train.collective_timeout: got 0.0, must be > 0"),
])
def test_bad_params_name_the_key(mutate, message):
    params = real_params()
    mutate(params)
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(params)


@pytest.mark.parametrize("launcher, processes", [
    ("python", 1), ("accelerate launch --num_processes 4", 4), ("accelerate launch --multi_gpu", None),
    ("accelerate launch --cpu --mixed_precision bf16", None), ("torchrun --nproc_per_node 2", 2),
    ("torchrun --standalone --nproc-per-node=4", 4), ("python -m torch.distributed.run --nproc_per_node 2", 2),
    ("/opt/venv/bin/python3.11", 1)])
def test_usual_launchers_are_accepted(launcher, processes):
    params = real_params()
    params["train"]["launcher"] = launcher
    assert parse_params(params).train.launcher == launcher
    # What the lora_epoch stage checks the running process count against (None: the launcher decides).
    assert launcher_processes(launcher) == processes


def test_every_default_is_within_its_range():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            valid = f.metadata.get("valid")
            value = getattr(cls(), f.name)
            assert not valid or value is None or valid[1](value), f"{cls.__name__}.{f.name}={value!r}"


def test_a_key_given_twice_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_size: 4\n  lr: 0.2\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: .*key 'lr' appears twice .*line 2"):
        load_params(path)


def test_int_is_accepted_for_float_and_missing_sections_default():
    params = parse_params({"train": {"lr": 1}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.model.name == "embedded:smollm2"


def test_cli_epochs_rewrites_a_consistent_chain(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(cli, ["epochs", "4", "--params", str(path), "--evaluate", "last"])
    assert result.exit_code == 0, result.output
    params = load_params(path)
    assert list(params.epochs) == [1, 2, 3, 4]
    assert [e.evaluate for e in params.epochs.values()] == [False, False, False, True]
    assert params.model == load_params(ROOT / "params.yaml").model  # the rest is untouched


def test_cli_epochs_keeps_comments_and_layout_and_refuses_bad_counts(tmp_path):
    path = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    path.write_text(original)
    result = CliRunner().invoke(cli, ["epochs", "3", "--params", str(path)])
    assert result.exit_code == 0 and "3 epoch stage(s)" in result.output
    rewritten = path.read_text()
    # Only the epochs section changed: every other line (comments, nulls, long strings) is kept.
    before, after = original.split("\nepochs:")[0], rewritten.split("\nepochs:")[0]
    assert after == before
    assert rewritten.endswith("  '2': {prev: 1, evaluate: true}\n  '3': {prev: 2, evaluate: true}\n")
    for bad in ("0", "-2"):
        result = CliRunner().invoke(cli, ["epochs", "--params", str(path), "--", bad])
        assert result.exit_code != 0 and "need at least 1 epoch" in result.output
        assert path.read_text() == rewritten  # nothing written


def test_stage_reports_params_error_in_one_line(tmp_path):
    bad = real_params()
    bad["lora"]["rank"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "init_lora.py"), "--params", "params.yaml", "--base", "x",
         "--train", "t.parquet", "--out", "o", "--stats", "s.parquet"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "lora.rank: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_paper_profile_is_valid_and_builds_the_dag(tmp_path):
    """The paper's GSM8K profile parses, and DVC builds its 10-epoch DAG (not run here)."""
    from test_pipeline import make_repo, run

    params = load_params(ROOT / "profiles" / "gsm8k_paper.yaml")
    assert (params.model.name, params.train.lr, params.train.max_length) == ("meta-llama/Llama-3.1-8B-Instruct", 5e-6, 128)
    assert (params.teacher.engine, params.teacher.model, params.symbolic.every) == ("openai", "gpt-4o", 2)
    assert len(params.epochs) == 10 and params.symbolic.max_iters == 3 and params.symbolic.ratio == 0.1
    repo = make_repo(tmp_path, {})
    (repo / "profiles").mkdir()
    (repo / "profiles" / "gsm8k_paper.yaml").write_text((ROOT / "profiles" / "gsm8k_paper.yaml").read_text())
    run(["nslora", "profile", "gsm8k_paper"], repo)
    dry = run(["dvc", "repro", "--dry", "--force"], repo).stdout  # --force: nothing has run yet
    for stage in ("prepare", "lora_epoch@1", "lora_epoch@10", "symbolic_rewrite@10", "evaluate@10", "synthesize_dataset"):
        assert f"Running stage '{stage}'" in dry
    assert "--epoch 10" in dry


def test_study_profile_is_valid_and_rewrites_after_epoch_1_only():
    """The study's profile parses, and its schedule gives symbolic updates after epoch 1 and not
    after the last epoch (whose rewrites no later epoch would train on)."""
    from nslora.selection.criteria import should_trigger

    params = load_params(ROOT / "profiles" / "study_chain_sum.yaml")
    assert (params.data.task, params.data.train_size, len(params.epochs)) == ("chain_sum", 128, 2)
    assert [should_trigger(k, params.symbolic, None)[0] for k in (1, 2)] == [True, False]


def test_gsm8k_qwen_profile_has_a_student_that_can_move_and_the_capable_teacher():
    from nslora.selection.criteria import should_trigger

    params = load_params(ROOT / "profiles" / "gsm8k_qwen.yaml")
    assert params.model.name == "embedded:qwen2.5-coder-0.5b"
    assert (params.teacher.engine, params.teacher.model) == ("local", "embedded:qwen2.5-coder-1.5b")
    assert params.data.source == "gsm8k" and params.data.test_size >= 150 and len(params.epochs) == 2
    assert [should_trigger(k, params.symbolic, None)[0] for k in (1, 2)] == [True, False]
    # Whole attempts fit the budget: every sample in flight gets its 4 calls per iteration.
    assert params.teacher.max_calls_per_epoch >= 4 * params.symbolic.max_iters * params.teacher.concurrency
