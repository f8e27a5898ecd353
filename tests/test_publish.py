"""The remade dataset: `nslora.remade.synthesize`, its stage, and publishing it with DVC.

Run as: python -m pytest tests/test_publish.py -q   (about 30 s; no model, no network)

Inputs are made by the real symbolic-update code (`rewrite_epoch` with the offline hint rewriter and
a scripted student), so the provenance columns are the ones the pipeline writes. The end-to-end
test runs `dvc repro` of the synthesize_dataset stage in a temporary git repository, pushes to a
local remote, and fetches the file back with `dvc pull` in a fresh clone and with `dvc get`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import typing
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT, make_examples
from nslora.config import DataConfig, SymbolicConfig
from nslora.remade import COLUMN_DESCRIPTIONS, SOURCE_LICENSES, rewrite_counts, synthesize
from nslora.schemas import EXAMPLES, REMADE, REWRITES, SchemaError, read_table, write_table
from nslora.symbolic import HintRewriter, Proposal, rewrite_epoch

CFG = SymbolicConfig(max_iters=2, student_max_new_tokens=8)

# The stanza proposed for dvc.yaml, used verbatim by the end-to-end test.
STANZA = """\
  synthesize_dataset:
    cmd: >-
      python stages/synthesize_dataset.py --params params.yaml --train-dir data/train
      --rewrites-dir data/rewrites --out data/remade/train.parquet --card data/remade/README.md
      --metrics metrics/remade.json
    deps:
      - stages/synthesize_dataset.py
      - src/nslora/remade
      - src/nslora/answers.py
      - src/nslora/schemas.py
      - data/train
      - data/rewrites
    params:
      - epochs
      - data.source
      - criteria
      - method
      - teacher.engine
      - teacher.model
    outs:
      - data/remade/train.parquet
      - data/remade/README.md:
          cache: false
    metrics:
      - metrics/remade.json:
          cache: false
"""


class HintedStudent:
    """Scripted student: right (18 legs) only once a hint is shown; the tiny model never is."""

    def answer(self, system_prompt, questions, max_new_tokens=256):
        return ["... #### 18" if "Hint:" in q else "#### 5" for q in questions]


class NumberDroppingRewriter(HintRewriter):
    """Hints, except for one sample whose proposal drops the numbers (a rejected rewrite)."""

    def __init__(self, bad_id: str):
        self.bad_id = bad_id

    def propose(self, sample, question, student_output, iteration, refused=None):
        if sample.id == self.bad_id:
            return Proposal("How many legs do the animals have in total?")
        return super().propose(sample, question, student_output, iteration)


def wrong(train: pd.DataFrame, rows: list[int]) -> pd.DataFrame:
    """The selection: `rows` were selected and answered wrongly."""
    return pd.DataFrame({"id": train["id"], "student_output": "#### 5",
                         "correct": [i not in rows for i in range(len(train))]})


def two_epochs(n: int = 8) -> tuple[list[pd.DataFrame], list[pd.DataFrame], list[dict]]:
    """Training tables of epochs 0..2, rewrite logs of epochs 1..2 and their metrics.

    Epoch 1 hints samples 0, 1, 2 (2 is then answered right: 'correct'; 0 and 1: 'max_iters').
    Epoch 2 tries 0 again (all hints shown: 'no_more_hints', rejected), 3 ('max_iters') and 4
    (numbers dropped: 'numbers_changed', rejected).
    """
    student = HintedStudent()
    train0 = make_examples(n).assign(source="reasoning_gym/leg_counting")
    first = rewrite_epoch(train0, wrong(train0, [0, 1, 2]), HintRewriter(), student, 1, CFG, 1,
                          "hint", progress=False)
    bad = str(train0["id"][4])
    second = rewrite_epoch(first.train, wrong(first.train, [0, 3, 4]), NumberDroppingRewriter(bad),
                           student, 2, CFG, 1, "hint", progress=False)
    return [train0, first.train, second.train], [first.log, second.log], [first.metrics, second.metrics]


def run_synthesize(n: int = 8, **overrides):
    tables, logs, _ = two_epochs(n)
    kwargs = {"criterion": "loss_ratio", "teacher": "hint", "method": "nslora",
              "source_license": SOURCE_LICENSES["reasoning_gym"], **overrides}
    return synthesize(tables[-1], logs, **kwargs)


def front_matter(card: str) -> tuple[dict, str]:
    _, head, body = card.split("---\n", 2)
    return yaml.safe_load(head), body


# ----------------------------------------------------------------------------- synthesize (units)

def test_counts_and_provenance():
    tables, logs, metrics = two_epochs()
    table, _ = synthesize(tables[-1], logs, criterion="loss_ratio", teacher="hint", method="nslora",
                          source_license="apache-2.0")
    assert table.columns.tolist() == REMADE.names and len(table) == 8
    final = tables[-1].reset_index(drop=True)
    assert (table["id"] == final["id"]).all() and (table["question"] == final["question"]).all()
    assert (table["answer"] == tables[0]["solution"]).all()          # gold answers never change
    assert (table["final_answer"] == tables[0]["final_answer"]).all()
    assert (table["original_question"] == tables[0]["question"]).all()
    by_id = table.set_index("id")
    ids = tables[0]["id"].tolist()
    assert sorted(by_id.index[by_id["rewritten"]]) == [ids[i] for i in (0, 1, 2, 3)]
    provenance = ["rewrite_epoch", "rewrite_iterations", "rewrite_reason", "teacher"]
    assert by_id.loc[ids[0], provenance].tolist() == [1, 2, "max_iters", "hint"]
    assert by_id.loc[ids[2], provenance].tolist() == [1, 1, "correct", "hint"]
    assert by_id.loc[ids[3], "rewrite_epoch"] == 2
    untouched = by_id.loc[[ids[i] for i in (4, 5, 6, 7)]]
    assert (untouched["question"] == untouched["original_question"]).all()
    assert (untouched["teacher"] == "").all() and (untouched["rewrite_reason"] == "").all()
    assert (untouched["rewrite_epoch"] == 0).all()
    assert (table["criterion"] == "loss_ratio").all()

    counts = rewrite_counts(logs)
    assert (counts["attempted"], counts["accepted"], counts["rejected"]) == (6, 4, 2)
    assert counts["rejected_by_reason"] == {"no_more_hints": 1, "numbers_changed": 1}
    assert counts["accepted_by_outcome"] == {"correct": 1, "max_iters": 3}
    # The same figures the symbolic_rewrite stage reported epoch by epoch.
    assert [e["accepted"] for e in counts["per_epoch"]] == [m["accepted"] for m in metrics]
    merged: dict[str, int] = {}
    for m in metrics:
        for reason, count in m["rejected_by_reason"].items():
            merged[reason] = merged.get(reason, 0) + count
    assert counts["rejected_by_reason"] == merged


def test_card_states_source_method_counts_columns_and_loading():
    table, card = run_synthesize(teacher="openai:gpt-4o", criterion="grad_norm")
    meta, body = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["task_categories"] and meta["size_categories"] == ["n<1K"]
    assert meta["configs"][0]["data_files"][0] == {"split": "train", "path": "train.parquet"}
    for text in ("reasoning-gym", "`reasoning_gym/leg_counting`", "Apache-2.0", "`nslora`", "`grad_norm`",
                 "`openai:gpt-4o`", "Epochs: 2",
                 "| rows | 8 |", "| rewritten (question differs from the source) | 4 |",
                 "| rewrite attempts, all epochs | 6 |", "| rejected | 2 |",
                 "| no_more_hints | 1 |", "| numbers_changed | 1 |", "| 2 | 3 | 1 | 2 |",
                 'load_dataset("parquet", data_files="data/remade/train.parquet")',
                 "dvc get <repo-url> data/remade/train.parquet",
                 "dvc pull data/remade/train.parquet"):
        assert text in body, text
    for column in REMADE.names:
        assert f"| `{column}` |" in body
    assert set(COLUMN_DESCRIPTIONS) == set(REMADE.names)
    # The rewrites were written by 'hint' (rewrite_engine), not by the configured teacher: said so.
    assert "rewrites by `hint`" in body


@pytest.mark.parametrize("source, license_id, name", [
    ("reasoning_gym", "apache-2.0", "Apache-2.0"), ("gsm8k", "mit", "MIT"),
    ("clinifact", "mit", "MIT"), ("babi", "cc-by-3.0", "CC BY 3.0"),
])
def test_every_source_has_its_licence(source, license_id, name):
    assert set(SOURCE_LICENSES) == set(typing.get_args(typing.get_type_hints(DataConfig)["source"]))
    assert SOURCE_LICENSES[source] == license_id
    tables, logs, _ = two_epochs()
    train = tables[-1].assign(source=f"{source}/x" if source in ("reasoning_gym", "babi") else source)
    _, card = synthesize(train, logs, criterion="random", teacher="hint", method="nslora",
                         source_license=SOURCE_LICENSES[source])
    meta, body = front_matter(card)
    assert meta["license"] == license_id and f"**{name}**" in body


def test_datasets_load_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    table, card = run_synthesize()
    folder = tmp_path / "remade"
    path = write_table(table, folder / "train.parquet", REMADE)
    (folder / "README.md").write_text(card)
    pd.testing.assert_frame_equal(read_table(path, REMADE), table)

    cache = str(tmp_path / "hf_cache")
    ds = datasets.load_dataset("parquet", data_files=str(path), cache_dir=cache)["train"]
    assert ds.column_names == REMADE.names and ds.num_rows == len(table)
    assert ds.features["rewritten"].dtype == "bool" and ds.features["rewrite_epoch"].dtype == "int64"
    assert ds["question"] == table["question"].tolist() and sum(ds["rewritten"]) == 4
    # The card's `configs` let the folder itself load, as on the Hugging Face hub.
    again = datasets.load_dataset(str(folder), cache_dir=cache)["train"]
    assert again["id"] == table["id"].tolist()


def test_schema_and_input_validation(tmp_path):
    table, _ = run_synthesize()
    bad = table.assign(rewritten=table["rewritten"].map({True: "yes", False: "no"}))
    with pytest.raises(SchemaError, match="rewritten"):
        write_table(bad, tmp_path / "bad.parquet", REMADE)
    path = write_table(table, tmp_path / "remade.parquet", REMADE)
    with pytest.raises(SchemaError, match="nslora.examples"):
        read_table(path, EXAMPLES)

    tables, logs, _ = two_epochs()
    kwargs = {"criterion": "loss_ratio", "teacher": "hint", "method": "nslora", "source_license": "mit"}
    with pytest.raises(ValueError, match="only 1 epoch log"):
        synthesize(tables[-1], logs[:1], **kwargs)              # epoch 2 rewrites without its log
    with pytest.raises(ValueError, match="holds rows of epoch"):
        synthesize(tables[-1], logs[::-1], **kwargs)
    with pytest.raises(ValueError, match="ids not in the final training table"):
        synthesize(tables[-1].iloc[1:], logs, **kwargs)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['solution'\]"):
        synthesize(tables[-1].drop(columns=["solution"]), logs, **kwargs)
    with pytest.raises(ValueError, match="licence"):
        synthesize(tables[-1], logs, **{**kwargs, "source_license": " "})


def test_no_rewrites_gives_the_source_unchanged():
    train = make_examples(5)
    empty = pd.DataFrame({f.name: pd.Series(dtype=f.type.to_pandas_dtype()) for f in REWRITES})
    table, card = synthesize(train, [empty], criterion="loss_ratio", teacher="local:x", method="lora",
                             source_license="mit")
    assert not table["rewritten"].any() and (table["question"] == train["question"]).all()
    assert "| rewrite attempts, all epochs | 0 |" in card and "(none)" in card


# ------------------------------------------------------------------------------------- the stage

def load_stage():
    path = ROOT / "stages" / "synthesize_dataset.py"
    spec = importlib.util.spec_from_file_location("synthesize_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_inputs(root: Path, n: int = 8) -> list[pd.DataFrame]:
    tables, logs, _ = two_epochs(n)
    for k, table in enumerate(tables):
        write_table(table, root / "data" / "train" / f"epoch_{k}.parquet", EXAMPLES)
    for k, log in enumerate(logs, start=1):
        write_table(log, root / "data" / "rewrites" / f"epoch_{k}.parquet", REWRITES)
    return tables


def stage_args(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--train-dir", str(root / "data" / "train"),
            "--rewrites-dir", str(root / "data" / "rewrites"),
            "--out", str(root / "data" / "remade" / "train.parquet"),
            "--card", str(root / "data" / "remade" / "README.md"),
            "--metrics", str(root / "metrics" / "remade.json")]


def test_stage_uses_the_last_declared_epoch_and_ignores_stale_files(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")   # 2 epochs, reasoning_gym
    tables = write_inputs(tmp_path)
    # Left over from a 3-epoch run: must not be read.
    write_table(make_examples(3), tmp_path / "data" / "train" / "epoch_3.parquet", EXAMPLES)
    (tmp_path / "data" / "rewrites" / "epoch_3.parquet").write_text("stale")
    result = CliRunner().invoke(load_stage().main, stage_args(tmp_path))
    assert result.exit_code == 0, result.output
    remade = read_table(tmp_path / "data" / "remade" / "train.parquet", REMADE)
    assert remade["id"].tolist() == tables[2]["id"].tolist()
    assert remade["question"].tolist() == tables[2]["question"].tolist()
    metrics = json.loads((tmp_path / "metrics" / "remade.json").read_text())
    assert metrics == {"rows": 8, "rewritten": 4, "fraction": 0.5, "attempted": 6, "rejected": 2}
    card = (tmp_path / "data" / "remade" / "README.md").read_text()
    teacher = yaml.safe_load((ROOT / "params.yaml").read_text())["teacher"]["model"]
    assert front_matter(card)[0]["license"] == "apache-2.0" and f"`local:{teacher}`" in card


def test_stage_missing_log_is_a_one_line_user_error(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    write_inputs(tmp_path)
    (tmp_path / "data" / "rewrites" / "epoch_1.parquet").unlink()
    result = CliRunner().invoke(load_stage().main, stage_args(tmp_path))
    assert result.exit_code == 2 and "epoch_1.parquet: no such file" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------- publishing, end to end (DVC)

def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, \
        f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_publish_push_then_pull_in_a_fresh_clone_and_dvc_get(tmp_path):
    """dvc repro -> dvc push to a local remote -> git clone + dvc pull, and dvc get: same bytes."""
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "synthesize_dataset.py", repo / "stages")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text("stages:\n" + STANZA)
    write_inputs(repo)
    # The stage runs the copied code, as it would in a clone of the project.
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "test@example.com"], repo)
    sh(["git", "config", "user.name", "test"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["dvc", "add", "-q", "data/train", "data/rewrites"], repo)
    assert "Running stage 'synthesize_dataset'" in sh(["dvc", "repro"], repo, env).stdout
    original = repo / "data" / "remade" / "train.parquet"
    digest = sha256(original)
    assert json.loads((repo / "metrics" / "remade.json").read_text())["rewritten"] == 4

    # The default remote, a sibling of the repository: DVC stores a relative URL relative to .dvc/.
    sh(["dvc", "remote", "add", "-d", "storage", "../storage"], repo)
    config = (repo / ".dvc" / "config").read_text()
    assert "remote = storage" in config and "url = ../../storage" in config
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "remade dataset"], repo)
    sh(["dvc", "push"], repo, env)
    assert any((tmp_path / "storage").rglob("*")), "dvc push stored nothing"

    # A colleague: a fresh clone (beside the original, so ../../storage is the same folder).
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data" / "remade" / "train.parquet").exists()
    sh(["dvc", "pull", "data/remade/train.parquet"], clone, env)
    assert sha256(clone / "data" / "remade" / "train.parquet") == digest
    assert not (clone / "data" / "train").exists()               # only what was asked for
    card = Path("data", "remade", "README.md")                  # cache: false, so in git
    assert (clone / card).read_text() == (repo / card).read_text()

    # A clone elsewhere points the remote at the folder in its untracked config.local.
    far = tmp_path / "elsewhere" / "clone"
    sh(["git", "clone", "-q", str(repo), str(far)], tmp_path)
    sh(["dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "storage")], far)
    sh(["dvc", "pull", "data/remade/train.parquet"], far, env)
    assert sha256(far / "data" / "remade" / "train.parquet") == digest

    # dvc get without a clone; with the original's cache and workspace copy gone, the bytes can only
    # come from the remote.
    shutil.rmtree(repo / ".dvc" / "cache")
    original.unlink()
    got = tmp_path / "got" / "train.parquet"
    sh(["dvc", "get", str(repo), "data/remade/train.parquet", "-o", str(got)], tmp_path, env)
    assert sha256(got) == digest
    assert read_table(got, REMADE)["rewritten"].sum() == 4
