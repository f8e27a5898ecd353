"""params.yaml loads into frozen dataclasses; bad keys and types fail naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT
from nslora.config import SECTIONS, ParamsError, parse_params
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
])
def test_bad_params_name_the_key(mutate, message):
    params = real_params()
    mutate(params)
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_params(params)


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
    from nslora.criteria import should_trigger

    params = load_params(ROOT / "profiles" / "study_chain_sum.yaml")
    assert (params.data.task, params.data.train_size, len(params.epochs)) == ("chain_sum", 128, 2)
    assert [should_trigger(k, params.symbolic, None)[0] for k in (1, 2)] == [True, False]
