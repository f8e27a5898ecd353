"""The paper's methods as settings of one pipeline (params `method`).

  nslora          LoRA epochs + symbolic updates of questions (and optionally the system prompt)
  lora            LoRA epochs only
  prefix          peft prefix-tuning epochs only
  two_stage       TextGrad optimises one system prompt over the training set, then LoRA epochs
  lora_sysprompt  LoRA epochs + system-prompt refinement from critiques; questions never rewritten
"""

from __future__ import annotations

from dataclasses import replace

from .config import SymbolicConfig

NUMERICAL_ONLY = ("lora", "prefix", "two_stage")


def symbolic_settings(method: str, cfg: SymbolicConfig) -> SymbolicConfig:
    """The symbolic settings `method` runs with."""
    if method in NUMERICAL_ONLY:
        return replace(cfg, trigger="never")
    if method == "lora_sysprompt":
        return replace(cfg, update_system_prompt=True)
    return cfg


def rewrites_questions(method: str) -> bool:
    return method == "nslora"


def adapter_type(method: str) -> str:
    return "prefix" if method == "prefix" else "lora"
