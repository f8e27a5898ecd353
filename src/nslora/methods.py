"""The paper's methods as settings of one pipeline (params `method`); `METHODS` is the one list
of them and their properties, which params validation, the stages and the report read.

  nslora          LoRA epochs + symbolic updates of questions (and optionally the system prompt)
  lora            LoRA epochs only
  prefix          peft prefix-tuning epochs only
  two_stage       TextGrad optimises one system prompt over the training set, then LoRA epochs
  lora_sysprompt  LoRA epochs + system-prompt refinement from critiques; questions never rewritten
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports METHODS from here
    from .config import SymbolicConfig, TrainConfig


@dataclass(frozen=True)
class Method:
    adapter: str                   # the peft adapter its epochs train: 'lora' or 'prefix'
    symbolic_epochs: bool          # symbolic updates between epochs (else symbolic.trigger is 'never')
    rewrites_questions: bool       # its symbolic updates rewrite training questions
    refines_system_prompt: bool    # always refines the system prompt (nslora does when asked to)
    prompt_before_training: bool   # one system prompt optimised over the training set first
    description: str               # for params help and the remade dataset's card


METHODS: dict[str, Method] = {
    "nslora": Method("lora", True, True, False, False,
                     "neurosymbolic LoRA: LoRA epochs interleaved with TextGrad rewrites of the questions "
                     "the student still got wrong"),
    "lora": Method("lora", False, False, False, False,
                   "LoRA only (no symbolic update: the questions are the source's)"),
    "prefix": Method("prefix", False, False, False, False, "peft prefix-tuning only (no question rewrites)"),
    "two_stage": Method("lora", False, False, False, True,
                        "one system prompt optimised with TextGrad, then LoRA"),
    "lora_sysprompt": Method("lora", True, False, True, False,
                             "LoRA, then system-prompt refinement instead of question rewrites"),
}


def symbolic_settings(method: str, cfg: SymbolicConfig) -> SymbolicConfig:
    """The symbolic settings `method` runs with."""
    if not METHODS[method].symbolic_epochs:
        return replace(cfg, trigger="never")
    if METHODS[method].refines_system_prompt:
        return replace(cfg, update_system_prompt=True)
    return cfg


def rewrites_questions(method: str) -> bool:
    return METHODS[method].rewrites_questions


def adapter_type(method: str) -> str:
    return METHODS[method].adapter


def engine_name(engine: str, model: str) -> str:
    """The teacher as recorded in `rewrite_engine`, metrics and the remade dataset: 'hint', or the
    engine with its model ('local:embedded:qwen2.5-coder-1.5b', 'openai:gpt-4o')."""
    return engine if engine == "hint" else f"{engine}:{model}"


def check_teacher(method: str, engine: str, cfg: SymbolicConfig) -> None:
    """Methods that refine a system prompt learn from a teacher's critiques, which `hint` has none of."""
    if engine != "hint":
        return
    if METHODS[method].prompt_before_training:
        raise ValueError(f"method={method} optimises the prompt from a teacher's critiques: set "
                         "teacher.engine to local or openai")
    if not rewrites_questions(method) and symbolic_settings(method, cfg).trigger != "never":
        raise ValueError(f"method={method} refines the system prompt from a teacher's critiques: "
                         "set teacher.engine to local or openai (hint has no critiques)")


def training_settings(method: str, train: TrainConfig, prefix_lr: float) -> TrainConfig:
    """What an epoch trains with: prefix-tuning gets its own, much larger, learning rate
    (`lora.prefix_lr`)."""
    return replace(train, lr=prefix_lr) if adapter_type(method) == "prefix" else train

