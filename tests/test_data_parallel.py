"""Data parallelism: two real processes (`torchrun --nproc_per_node 2`, gloo on CPU) train one LoRA
epoch of the tiny model to the one-process run's weights and per-sample statistics, and evaluate
it to the one-process run's answers.

Batches are split across processes sample by sample and the gradients all-reduced, so two
processes must compute the same update as one. The 9 samples in batches of 4 end with a batch of
one: the second process gets no sample there and must still join the all-reduce (run without
micro-batches, and with micro-batches of one sample, where the other process accumulates
gradients without syncing first). A short `train.collective_timeout` turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, make_examples
from nslora.config import LoraParams, TrainConfig
from nslora.schemas import EXAMPLES, PREDICTIONS, SAMPLE_STATS, read_table, write_table
from nslora.numerical.training import BATCHES_FILE, init_adapter, read_meta

pytestmark = pytest.mark.integration

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launcher_param(launcher: list[str]) -> str:
    """The params.yaml launcher that starts as many processes as the command `launcher`."""
    return "python" if launcher == [sys.executable] else "torchrun --nproc_per_node 2"


def write_params(path, model_dir, **sections: dict) -> None:
    """The real params.yaml on the tiny model in fp32, with `sections` updated."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(name=str(model_dir), precision="fp32")
    for name, values in sections.items():
        params[name].update(values)
    path.write_text(yaml.safe_dump(params))


def train_section(train: TrainConfig, launcher: str) -> dict:
    return {"batch_size": train.batch_size, "max_length": train.max_length, "lr": train.lr, "seed": train.seed,
            "micro_batch_tokens": train.micro_batch_tokens, "launcher": launcher, "collective_timeout": 60.0}


def run_epoch(launcher: list[str], inputs: dict, out, timeout: float = 300):
    """The lora_epoch stage as dvc would run it; returns the adapter dir and the stats table."""
    out.mkdir()
    write_params(out / "params.yaml", inputs["model"],
                 train=train_section(inputs["train_config"], launcher_param(launcher)))
    cmd = [*launcher, str(ROOT / "stages" / "lora_epoch.py"), "--params", str(out / "params.yaml"), "--epoch", "1",
           "--base", str(inputs["model"]), "--prev", str(inputs["prev"]), "--train", str(inputs["train"]),
           "--out", str(out / "adapter"), "--stats", str(out / "stats.parquet"), "--metrics", str(out / "m.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "adapter", read_table(out / "stats.parquet", SAMPLE_STATS)


def make_inputs(root, model_dir, samples: int, train: TrainConfig) -> dict:
    examples = make_examples(samples)
    write_table(examples, root / "train.parquet", EXAMPLES)
    prev = init_adapter(model_dir, examples, LoraParams(r=4, alpha=8), train, root / "epoch_0")
    return {"model": model_dir, "prev": prev, "train": root / "train.parquet", "train_config": train}


# 120 tokens holds one sample of ~100: every sample is its own micro-batch.
@pytest.mark.parametrize("micro_batch_tokens", [0, 120])
def test_two_processes_equal_one(tiny_model_dir, tmp_path, micro_batch_tokens):
    train = TrainConfig(batch_size=4, max_length=128, lr=1e-2, seed=5, micro_batch_tokens=micro_batch_tokens)
    inputs = make_inputs(tmp_path, tiny_model_dir, 9, train)
    plan = json.loads((inputs["prev"] / BATCHES_FILE).read_text())
    assert sorted(len(b) for b in plan) == [1, 4, 4]  # the batch one process gets nothing of

    one_dir, one_stats = run_epoch([sys.executable], inputs, tmp_path / "one")
    two_dir, two_stats = run_epoch(TORCHRUN, inputs, tmp_path / "two")
    assert read_meta(one_dir)["processes"] == 1 and read_meta(two_dir)["processes"] == 2
    one_weights = load_file(one_dir / "adapter_model.safetensors")
    two_weights = load_file(two_dir / "adapter_model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        # fp32; the all-reduce sums the two halves' gradients in another order than one process.
        assert (weight - two_weights[name]).abs().max() < 1e-5, name
    assert sorted(one_stats["id"]) == sorted(two_stats["id"]) and len(one_stats) == 9
    one_stats, two_stats = (s.set_index("id").sort_index() for s in (one_stats, two_stats))
    for column in ("loss", "grad_norm", "answer_tokens", "batch_index"):
        pd.testing.assert_series_equal(one_stats[column], two_stats[column], rtol=1e-4, check_dtype=False)


def test_gsm8k_sized_plan_trains_under_two_processes(tiny_model_dir, tmp_path):
    """7,473 samples (GSM8K's training set) in batches of 8: 934 full batches and one of a single
    sample, trained by two processes to the end, every sample recorded once."""
    train = TrainConfig(batch_size=8, max_length=128, lr=1e-3, seed=0, micro_batch_tokens=0)
    inputs = make_inputs(tmp_path, tiny_model_dir, 7473, train)
    plan = json.loads((inputs["prev"] / BATCHES_FILE).read_text())
    assert len(plan) == 935 and sorted(len(b) for b in plan)[0] == 1
    adapter, stats = run_epoch(TORCHRUN, inputs, tmp_path / "two", timeout=600)
    meta = read_meta(adapter)
    assert meta["processes"] == 2 and meta["step"] == 935
    assert len(stats) == 7473 and stats["id"].is_unique and stats["loss"].notna().all()


def test_a_launch_that_runs_fewer_processes_than_asked_fails(tiny_model_dir, tmp_path):
    """A launcher that quietly runs one process (as `accelerate launch --cpu --num_processes 2`
    does) would train and record a one-process run: the stage refuses instead."""
    train = TrainConfig(batch_size=4, max_length=128, seed=5)
    inputs = make_inputs(tmp_path, tiny_model_dir, 4, train)
    write_params(tmp_path / "params.yaml", tiny_model_dir, train=train_section(train, "torchrun --nproc_per_node 2"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "lora_epoch.py"), "--params", str(tmp_path / "params.yaml"),
         "--epoch", "1", "--base", str(tiny_model_dir), "--prev", str(inputs["prev"]), "--train", str(inputs["train"]),
         "--out", str(tmp_path / "adapter"), "--stats", str(tmp_path / "s.parquet"), "--metrics", str(tmp_path / "m.json")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "asks for 2 processes, but this stage runs as 1" in result.stderr
    assert not (tmp_path / "adapter").exists()


def test_two_process_evaluation_equals_one(tiny_model_dir, tmp_path):
    """lm-eval's data parallelism under torchrun: each process answers part of the questions, the
    first gathers and writes everything; the answers are the one-process run's (fp32, greedy)."""
    test = write_table(make_examples(7, "test"), tmp_path / "test.parquet", EXAMPLES)
    outputs = {}
    for launcher, processes in (([sys.executable], 1), (TORCHRUN, 2)):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        write_params(out / "params.yaml", tiny_model_dir,
                     eval={"batch_size": 4, "max_new_tokens": 12, "launcher": launcher_param(launcher)})
        result = subprocess.run(
            [*launcher, str(ROOT / "stages" / "evaluate.py"), "--params", str(out / "params.yaml"), "--epoch", "0",
             "--base", str(tiny_model_dir), "--test", str(test), "--metrics", str(out / "eval.json"),
             "--predictions", str(out / "eval.parquet")],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "eval.json").read_text())
        assert summary["processes"] == processes and summary["n"] == 7
        outputs[processes] = read_table(out / "eval.parquet", PREDICTIONS).set_index("id").sort_index()
    pd.testing.assert_frame_equal(outputs[1], outputs[2])


def test_dvc_exp_run_with_torchrun_launchers(tiny_model_dir, tmp_path):
    """The README's commands: `dvc exp run -S train.launcher=... -S eval.launcher=...` trains and
    evaluates epoch 1 as two processes through dvc.yaml's commands."""
    from test_pipeline import make_repo, run

    repo = make_repo(tmp_path, {"model": {"name": str(tiny_model_dir), "precision": "fp32"},
                                "data": {"train_size": 9, "test_size": 4},
                                "train": {"batch_size": 4, "max_length": 512},
                                "eval": {"max_new_tokens": 8, "batch_size": 4}})
    launcher = "torchrun --standalone --nproc_per_node 2"
    run(["dvc", "exp", "run", "-S", f"train.launcher='{launcher}'", "-S", f"eval.launcher='{launcher}'",
         "evaluate@1"], repo)
    assert read_meta(repo / "models" / "adapters" / "epoch_1")["processes"] == 2
    assert json.loads((repo / "metrics" / "eval" / "epoch_1.json").read_text())["processes"] == 2
    assert len(read_table(repo / "data" / "stats" / "epoch_1.parquet", SAMPLE_STATS)) == 9
