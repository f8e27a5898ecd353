"""The paper's baselines as settings of one pipeline: prefix-tuning, two-stage, LoRA + system prompt."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_examples
from nslora.config import EvalConfig, LoraParams, SymbolicConfig, TrainConfig
from nslora.evaluation.harness import adapter_changes_logits, evaluate
from nslora.methods import rewrites_questions, symbolic_settings
from nslora.schemas import EXAMPLES, write_table
from nslora.selection.student import Student
from nslora.symbolic import CritiqueOnly, TextGradRewriter, optimize_initial_prompt, rewrite_epoch
from nslora.numerical.training import LoraTrainer, init_adapter
from test_symbolic import ScriptedTeacher

PROMPT = "You are a careful assistant. End your answer with '#### ' followed by the final answer."
NEW_PROMPT = "Add the legs of every group of animals. End your answer with '#### ' followed by the final answer."


def test_method_settings():
    cfg = SymbolicConfig()
    for method in ("lora", "prefix", "two_stage"):
        assert symbolic_settings(method, cfg).trigger == "never"
    assert symbolic_settings("lora_sysprompt", cfg).update_system_prompt
    assert symbolic_settings("nslora", cfg) == cfg
    assert rewrites_questions("nslora") and not rewrites_questions("lora_sysprompt")


def test_prefix_tuning_trains_and_is_evaluated(tiny_model_dir, tmp_path):
    train = make_examples(8)
    cfg = TrainConfig(batch_size=4, max_length=128, lr=5e-2)
    e0 = init_adapter(tiny_model_dir, train, LoraParams(prefix_tokens=4), cfg, tmp_path / "e0", adapter="prefix")
    trainer = LoraTrainer(tiny_model_dir, e0, cfg, precision="fp32")
    first = trainer.run_epoch(train, 1, progress=False)
    second = trainer.run_epoch(train, 2, progress=False)
    trainer.save(tmp_path / "e2", epoch=2, train_df=train)
    assert second["loss"].mean() < first["loss"].mean()
    assert first["grad_norm"].isna().all()  # per-sample norms are recorded for LoRA only
    before, after = load_file(str(e0 / "adapter_model.safetensors")), load_file(str(tmp_path / "e2" / "adapter_model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert adapter_changes_logits(tiny_model_dir, tmp_path / "e2") > 0
    test = write_table(make_examples(3, "test"), tmp_path / "test.parquet", EXAMPLES)
    summary, _ = evaluate(tiny_model_dir, tmp_path / "e2", test, PROMPT, EvalConfig(batch_size=4, max_new_tokens=4),
                          precision="fp32")
    assert summary["n"] == 3


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    return Student(tiny_model_dir, None, precision="fp32")


def prompt_teacher():
    return ScriptedTeacher(improve=lambda v: f"<IMPROVED_VARIABLE>{NEW_PROMPT if v.startswith('You are') else v}"
                                             "</IMPROVED_VARIABLE>")


def test_lora_sysprompt_refines_the_prompt_and_keeps_questions(student):
    train = make_examples(6, system_prompt=PROMPT)
    selected = train[["id"]].assign(student_output="no idea", correct=False).iloc[:3]
    cfg = symbolic_settings("lora_sysprompt", SymbolicConfig(max_iters=2, student_max_new_tokens=4))
    teacher = prompt_teacher()
    result = rewrite_epoch(train, selected, CritiqueOnly(TextGradRewriter(teacher, student, cfg)), student,
                           epoch=1, cfg=cfg, concurrency=2, engine_name="test", progress=False)
    assert result.metrics["accepted"] == 0 and (result.log["reason"] == "questions_frozen").all()
    assert (result.train["question"] == train["question"]).all()
    assert result.metrics["system_prompt_update"] == "accepted"
    assert (result.train["system_prompt"] == NEW_PROMPT).all() and result.system_prompt == NEW_PROMPT
    # One critique per sample, then the prompt update (gradient + step).
    assert [kind for kind, _, _ in teacher.calls].count("loss") == 3


def test_two_stage_optimises_the_prompt_before_training(student):
    train = make_examples(10, system_prompt=PROMPT)
    cfg = SymbolicConfig(max_iters=1, student_max_new_tokens=4)
    teacher = prompt_teacher()
    out, metrics = optimize_initial_prompt(train, TextGradRewriter(teacher, student, cfg), student, cfg,
                                           samples=4, seed=0, concurrency=2, progress=False)
    assert metrics["changed"] and metrics["rounds"][0] == {"wrong": 4, "update": "accepted"}
    assert (out["system_prompt"] == NEW_PROMPT).all()
    assert (out.drop(columns="system_prompt") == train.drop(columns="system_prompt")).all().all()


def test_prefix_generation_matches_the_training_forward(tiny_model_dir, tmp_path):
    """The evaluator generates with a prefix adapter exactly as its training forward scores text
    (greedy tokens equal an uncached argmax loop through peft's forward), batched and left-padded."""
    from nslora.evaluation.harness import build_lm

    e0 = init_adapter(tiny_model_dir, make_examples(4), LoraParams(prefix_tokens=4), TrainConfig(batch_size=4),
                      tmp_path / "e0", adapter="prefix")
    lm = build_lm(tiny_model_dir, e0, EvalConfig(batch_size=2), precision="fp32")
    tok = lm.tokenizer
    prompts = [tok("Q: 12 + 7 = ?").input_ids, tok("Q: how many legs have 3 spiders and 2 cats together?").input_ids]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_length=width + 6, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        assert out.shape == (2, width + 6) and torch.equal(out[:, :width], ids)
        for row, prompt in enumerate(prompts):
            current = torch.tensor([prompt])
            for _ in range(6):
                logits = lm.model(input_ids=current, attention_mask=torch.ones_like(current)).logits[0, -1]
                current = torch.cat([current, logits.argmax().view(1, 1)], dim=1)
            assert out[row, width:].tolist() == current[0, len(prompt):].tolist()
