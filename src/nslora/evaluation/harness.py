"""Evaluation through lm-evaluation-harness: the base model, optionally with a LoRA adapter.

The task (`tasks/nslora_cot_zeroshot.yaml`) has gsm8k_cot_zeroshot semantics over the prepared test
Parquet; the model's chat template and the adapter's system prompt are applied exactly as in
training (both use `nslora.prompts`). Generation is batched (lm-eval sorts requests by length).

    summary, predictions = evaluate(base_dir, adapter_dir, test_path, system_prompt, EvalConfig())
"""

from __future__ import annotations

import logging
import math
import os
import time
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from ..allocator import retain_freed_memory
from ..attention import DECODE, resolve
from ..config import EvalConfig
from ..models import END_OF_TURN, compute_device, load_tokenizer, resolve_dtype, speed_up_generation
from ..prompts import has_chat_template, plain_system_instruction

log = logging.getLogger(__name__)

TASK_NAME = "nslora_cot_zeroshot"
# gsm8k_cot_zeroshot's stop strings plus the end-of-turn markers of common chat templates.
STOP_STRINGS = ["Q:", "</s>", *END_OF_TURN]


def write_task_yaml(directory: Path | str, test_path: Path | str, max_new_tokens: int) -> Path:
    """Write a task YAML into `directory` that includes the packaged task and points it at
    `test_path` (lm-eval resolves the package's `!function` helpers relative to the included file).
    """
    import yaml

    packaged = resources.files("nslora.evaluation") / "tasks" / f"{TASK_NAME}.yaml"
    override = {
        "include": str(packaged),
        "task": TASK_NAME,
        "dataset_kwargs": {"data_files": {"test": str(Path(test_path).resolve())}},
        "generation_kwargs": {"until": STOP_STRINGS, "do_sample": False, "max_gen_toks": max_new_tokens},
    }
    path = Path(directory) / f"{TASK_NAME}.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def build_lm(base_dir: Path | str, adapter_dir: Path | str | None, eval_cfg: EvalConfig,
             precision: str = "auto", device: str | None = None, attention: str = "auto"):
    """lm-eval's HF model with the adapter attached through its `peft=` argument, generating
    greedy answers with continuous batching (`generation.ContinuousBatchingHFLM`)."""
    from .generation import ContinuousBatchingHFLM

    retain_freed_memory()
    device = device or str(compute_device())
    if device == "cpu":
        # Under a multi-process launcher (torchrun) the Accelerator lm-eval builds joins the other
        # processes (gloo) only when told it runs on CPUs; otherwise each process runs alone.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    dtype = resolve_dtype(precision, torch.device(device))
    lm = ContinuousBatchingHFLM(
        pretrained=str(base_dir),
        peft=str(adapter_dir) if adapter_dir else None,
        dtype=str(dtype).replace("torch.", ""),
        batch_size=eval_cfg.batch_size,
        device=device,
        max_length=4096,
        # On a CPU, decoding steps attend with `nslora_decode` (sdpa's CPU kernel is slow at one query).
        attn_implementation=resolve(attention, torch.device(device), DECODE),
    )
    speed_up_generation(lm.model, dtype)
    if adapter_dir and getattr(lm.model, "peft_type", None) == "PREFIX_TUNING":
        lm.model.generate = prefix_tuning_generate(lm.model, lm.tokenizer.pad_token_id)
    return lm


def prefix_tuning_generate(peft_model, pad_token_id: int):
    """`generate` for a prefix-tuning adapter that sees the prefix exactly as training did.

    peft's own generate (0.21 with transformers 5) injects the prefix into the KV cache but keeps the
    prompt's positions starting at 0, while its training forward places the prompt after the virtual
    tokens: measured here, a prefix trained to 0.16 loss then generated like the base model (0% vs
    the teacher-forced path's sensible answers). This places the prefix in the cache as P already
    "seen" positions (P placeholder ids, never computed) so positions and masks match training, and
    returns ids shaped as callers (lm-eval) expect: context + continuation.
    """
    virtual = peft_model.peft_config[peft_model.active_adapter].num_virtual_tokens

    def generate(input_ids, attention_mask=None, max_length=None, stopping_criteria=None, **kwargs):
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids = torch.cat([torch.full((batch, virtual), pad_token_id, dtype=input_ids.dtype,
                                    device=input_ids.device), input_ids], dim=1)
        mask = torch.cat([torch.ones((batch, virtual), dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        for criterion in stopping_criteria or []:
            if hasattr(criterion, "initial_decoder_input_length"):  # lm-eval's stop strings
                criterion.initial_decoder_input_length += virtual
        out = peft_model.base_model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=peft_model.get_prompt(batch),
            max_length=None if max_length is None else max_length + virtual,
            stopping_criteria=stopping_criteria, **kwargs)
        return out[:, virtual:]

    return generate


def run_lm_eval(lm, test_path: Path | str, system_prompt: str, eval_cfg: EvalConfig) -> dict:
    """Run the task with lm-eval's `simple_evaluate`; returns its result dict (samples logged)."""
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    chat = has_chat_template(lm.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        write_task_yaml(tmp, test_path, eval_cfg.max_new_tokens)
        return simple_evaluate(
            model=lm,
            tasks=[TASK_NAME],
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
            limit=eval_cfg.limit,
            system_instruction=system_prompt or None if chat else plain_system_instruction(system_prompt),
            apply_chat_template=chat,
            log_samples=True,
            bootstrap_iters=0,
        )


def evaluate(base_dir: Path | str, adapter_dir: Path | str | None, test_path: Path | str,
             system_prompt: str, eval_cfg: EvalConfig, precision: str = "auto",
             attention: str = "auto", epoch: int = 0, lm=None) -> tuple[dict, pd.DataFrame] | None:
    """Evaluate the base model (with `adapter_dir` when given) on the test Parquet.

    Returns:
        (summary, predictions): accuracy under both filters with its binomial standard error,
        counts and timing; and one row per question (schemas.PREDICTIONS). Under a multi-process
        launcher, only the first process gets them (lm-eval gathers every answer there); the
        others get None.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if lm is None and eval_cfg.backend == "vllm":
        from .vllm_backend import build_vllm_lm

        lm = build_vllm_lm(base_dir, adapter_dir, eval_cfg, precision)
    elif lm is None:
        lm = build_lm(base_dir, adapter_dir, eval_cfg, precision, attention=attention)
    start = time.perf_counter()
    results = run_lm_eval(lm, test_path, system_prompt, eval_cfg)
    seconds = time.perf_counter() - start
    if results is None:
        return None
    predictions = _predictions(results["samples"][TASK_NAME], epoch)
    n = len(predictions)
    accuracy = float(predictions["correct_flexible"].mean()) if n else 0.0
    summary = {
        "epoch": epoch,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "accuracy": round(accuracy, 6),
        "accuracy_strict": round(float(predictions["correct_strict"].mean()) if n else 0.0, 6),
        "stderr": round(math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0, 6),
        "n": n,
        "seconds": round(seconds, 1),
        "questions_per_s": round(n / seconds, 3) if seconds else None,
        "processes": lm.world_size,
        "backend": eval_cfg.backend,
    }
    return summary, predictions


def _predictions(samples: list[dict], epoch: int) -> pd.DataFrame:
    rows = {}
    for s in samples:
        doc = s["doc"]
        row = rows.setdefault(doc["id"], {
            "id": doc["id"], "epoch": epoch, "question": doc["question"],
            "final_answer": doc["final_answer"], "output": s["resps"][0][0],
        })
        column = "flexible_extract" if s["filter"] == "flexible-extract" else "strict_match"
        row[column] = s["filtered_resps"][0]
        row["correct_" + column.split("_")[0]] = bool(s["exact_match"])
    frame = pd.DataFrame(list(rows.values()))
    return frame.sort_values("id").reset_index(drop=True)


def adapter_changes_logits(base_dir: Path | str, adapter_dir: Path | str, text: str = "Q: 1 + 1 = ?") -> float:
    """Max |logit difference| between the base model and base + adapter as lm-eval loads them.

    Guards against an evaluator that silently drops the adapter (seen elsewhere): a trained adapter
    must give a non-zero difference.
    """
    cfg = EvalConfig(batch_size=1)
    with_adapter = build_lm(base_dir, adapter_dir, cfg, precision="fp32", device="cpu")
    without = build_lm(base_dir, None, cfg, precision="fp32", device="cpu")
    ids = load_tokenizer(base_dir)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (with_adapter._model_call(ids) - without._model_call(ids)).abs().max()
    return float(diff)
