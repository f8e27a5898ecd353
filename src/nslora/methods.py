"""The paper's methods as settings of one pipeline (params `method`).

  nslora          LoRA epochs + symbolic updates of questions (and optionally the system prompt)
  lora            LoRA epochs only
  prefix          peft prefix-tuning epochs only
  two_stage       TextGrad optimises one system prompt over the training set, then LoRA epochs
  lora_sysprompt  LoRA epochs + system-prompt refinement from critiques; questions never rewritten
"""

from __future__ import annotations

from dataclasses import replace

from .config import SymbolicConfig, TrainConfig

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


def engine_name(engine: str, model: str) -> str:
    """The teacher as recorded in `rewrite_engine`, metrics and the remade dataset: 'hint', or the
    engine with its model ('local:embedded:qwen2.5-coder-1.5b', 'openai:gpt-4o')."""
    return engine if engine == "hint" else f"{engine}:{model}"


def check_teacher(method: str, engine: str, cfg: SymbolicConfig) -> None:
    """Methods that refine a system prompt learn from a teacher's critiques, which `hint` has none of."""
    if engine != "hint":
        return
    if method == "two_stage":
        raise ValueError("method=two_stage optimises the prompt from a teacher's critiques: set "
                         "teacher.engine to local or openai")
    if not rewrites_questions(method) and symbolic_settings(method, cfg).trigger != "never":
        raise ValueError(f"method={method} refines the system prompt from a teacher's critiques: "
                         "set teacher.engine to local or openai (hint has no critiques)")


def training_settings(method: str, train: TrainConfig, prefix_lr: float) -> TrainConfig:
    """What an epoch trains with: prefix-tuning gets its own, much larger, learning rate
    (`lora.prefix_lr`)."""
    return replace(train, lr=prefix_lr) if method == "prefix" else train

