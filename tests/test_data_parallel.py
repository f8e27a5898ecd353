"""Data parallelism: `accelerate launch --cpu --num_processes 2` (gloo) of one LoRA epoch of the tiny
model gives the one-process run's weights and per-sample statistics.

Batches are split across processes sample by sample and the gradients all-reduced, so two
processes must compute the same update as one. The 9 samples in batches of 4 end with a batch of
one: the second process gets no sample there and must still join the all-reduce.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, make_examples
from nslora.config import LoraParams, TrainConfig
from nslora.schemas import EXAMPLES, SAMPLE_STATS, read_table, write_table
from nslora.numerical.training import init_adapter

pytestmark = pytest.mark.integration

TRAIN = TrainConfig(batch_size=4, max_length=128, lr=1e-2, seed=5, micro_batch_tokens=0)


def run_epoch(launcher: list[str], inputs: dict, out) -> tuple[dict, pd.DataFrame]:
    out.mkdir()
    cmd = [*launcher, str(ROOT / "stages" / "lora_epoch.py"), "--params", str(inputs["params"]), "--epoch", "1",
           "--base", str(inputs["model"]), "--prev", str(inputs["prev"]), "--train", str(inputs["train"]),
           "--out", str(out / "adapter"), "--stats", str(out / "stats.parquet"), "--metrics", str(out / "m.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors"), read_table(out / "stats.parquet", SAMPLE_STATS)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("data_parallel")
    train = make_examples(9)
    write_table(train, root / "train.parquet", EXAMPLES)
    prev = init_adapter(tiny_model_dir, train, LoraParams(r=4, alpha=8), TRAIN, root / "epoch_0")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(name=str(tiny_model_dir), precision="fp32")
    params["train"].update(batch_size=TRAIN.batch_size, max_length=TRAIN.max_length, lr=TRAIN.lr,
                           seed=TRAIN.seed, micro_batch_tokens=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"model": tiny_model_dir, "prev": prev, "train": root / "train.parquet", "params": root / "params.yaml"}


def test_two_processes_equal_one(inputs, tmp_path):
    accelerate = shutil.which("accelerate") or pytest.fail("accelerate's launcher is not installed")
    one_weights, one_stats = run_epoch([sys.executable], inputs, tmp_path / "one")
    two_weights, two_stats = run_epoch([accelerate, "launch", "--cpu", "--num_processes", "2",
                                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
                                       inputs, tmp_path / "two")
    assert one_weights.keys() == two_weights.keys()
    for name, weight in one_weights.items():
        # fp32; the all-reduce sums the two halves' gradients in another order than one process.
        assert (weight - two_weights[name]).abs().max() < 1e-5, name
    assert sorted(one_stats["id"]) == sorted(two_stats["id"]) and len(one_stats) == 9
    one_stats, two_stats = (s.set_index("id").sort_index() for s in (one_stats, two_stats))
    for column in ("loss", "grad_norm", "answer_tokens"):
        pd.testing.assert_series_equal(one_stats[column], two_stats[column], rtol=1e-4, check_dtype=False)
