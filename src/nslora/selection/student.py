"""The student: the base model with an epoch's adapter, answering training questions.

Used by the symbolic stages to find samples the student gets wrong and to re-ask rewritten
questions. Prompts are built exactly as in training and evaluation (`nslora.prompts`); decoding is
greedy, so answers are deterministic.

    student = Student("models/base", "models/adapters/epoch_1")
    outputs = student.answer(system_prompt, ["How many legs ...?"], max_new_tokens=256)
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import prompts
from ..models import (base_load_kwargs, compute_device, load_tokenizer, resolve_attention, resolve_dtype,
                      speed_up_generation, stop_token_ids)


class Student:
    """Batched greedy generation with a LoRA adapter; safe to call from several threads."""

    def __init__(self, base_dir: Path | str, adapter_dir: Path | str | None, precision: str = "auto",
                 attention: str = "auto", batch_size: int = 32):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.device = compute_device()
        self.dtype = resolve_dtype(precision, self.device)
        self.tokenizer = load_tokenizer(base_dir)
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, attn_implementation=resolve_attention(attention),
            **base_load_kwargs(self.dtype, self.device))
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.to(self.device).eval()
        speed_up_generation(self.model, self.dtype)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self.stop_ids = stop_token_ids(self.tokenizer)

    def answer(self, system_prompt: str, questions: list[str], max_new_tokens: int = 256,
               progress: bool = False) -> list[str]:
        """Greedy answers to `questions`, in order."""
        texts = [prompts.prompt_text(self.tokenizer, system_prompt, q) for q in questions]
        # Longest first: batches of similar length pad less.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        outputs: list[str] = [""] * len(texts)
        starts = range(0, len(order), self.batch_size)
        with self._lock, torch.no_grad():
            for start in tqdm(starts, desc="student answers", disable=not progress):
                batch = order[start:start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
                generated = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                    pad_token_id=self.tokenizer.pad_token_id)
                new = generated[:, enc["input_ids"].shape[1]:]
                for i, ids in zip(batch, new):
                    outputs[i] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return outputs
