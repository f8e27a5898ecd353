"""How a question becomes model input — one definition for training, evaluation and the student.

The user turn follows lm-eval's `gsm8k_cot_zeroshot` ("Q: ...\\nA: Let's think step by step.") and
is wrapped by the model's own chat template with the global system prompt. Models without a chat
template (base models such as Gemma 3 270M) get lm-eval's plain-text layout instead, so the text
trained on is exactly the context lm-eval generates from (`apply_chat_template=False`):

    prompt_text(tokenizer, system_prompt, question)            # what the model is conditioned on
    answer_text(tokenizer, system_prompt, question, solution)  # what follows it in training
"""

from __future__ import annotations

COT_TRIGGER = "Let's think step by step."


def user_turn(question: str) -> str:
    """The user message for a question (lm-eval gsm8k_cot_zeroshot's doc_to_text)."""
    return f"Q: {question.strip()}\nA: {COT_TRIGGER}"


def messages(system_prompt: str, question: str) -> list[dict[str, str]]:
    chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return chat + [{"role": "user", "content": user_turn(question)}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# Between the system prompt and the question in the plain layout (no chat template). lm-eval joins
# its system instruction and the question with nothing in between, so evaluation passes the system
# prompt with this separator appended (nslora.evaluation.harness): both sides then read the same text.
PLAIN_SYSTEM_SEPARATOR = "\n\n"


def plain_prompt(system_prompt: str, question: str) -> str:
    """Prompt layout for models without a chat template: lm-eval's plain-text context for
    `system_instruction=plain_system_instruction(system_prompt)` with the task's `doc_to_text`."""
    return f"{plain_system_instruction(system_prompt) or ''}{user_turn(question)}"


def plain_system_instruction(system_prompt: str) -> str | None:
    return f"{system_prompt}{PLAIN_SYSTEM_SEPARATOR}" if system_prompt else None


# What follows the plain prompt before the solution: lm-eval's `target_delimiter` (the context
# ends at "step by step." and the model continues from there).
PLAIN_ANSWER_DELIMITER = " "


def default_bos(tokenizer) -> str:
    """The BOS token text if the tokenizer prepends BOS by default (Gemma does), else ''.

    Training tokenises prompts with `add_special_tokens=False`, while lm-eval tokenises a plain
    context with the tokenizer's defaults (adding BOS) unless the text already starts with BOS.
    Putting BOS into the prompt text makes both give the same ids; Gemma degrades without BOS.
    """
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("Q")["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def prompt_text(tokenizer, system_prompt: str, question: str) -> str:
    """The exact text the model is conditioned on before it answers.

    With a chat template this is lm-eval's context as is; without one it is lm-eval's context
    preceded by the BOS token lm-eval's tokenisation adds (see `default_bos`).
    """
    if not has_chat_template(tokenizer):
        return default_bos(tokenizer) + plain_prompt(system_prompt, question)
    return tokenizer.apply_chat_template(
        messages(system_prompt, question), tokenize=False, add_generation_prompt=True
    )


def answer_text(tokenizer, system_prompt: str, question: str, solution: str) -> str:
    """The text that follows `prompt_text` in a training sample, including the end-of-turn marker.

    Taken from the chat template's rendering of the whole conversation, so the model learns to end
    its turn exactly the way the template (and generation's stop strings) expect. Without a chat
    template: a space (lm-eval's target delimiter), the solution, then EOS.
    """
    if has_chat_template(tokenizer):
        prompt = prompt_text(tokenizer, system_prompt, question)
        full = tokenizer.apply_chat_template(
            messages(system_prompt, question) + [{"role": "assistant", "content": solution}],
            tokenize=False,
        )
        if full.startswith(prompt) and solution in full[len(prompt):]:
            return full[len(prompt):]
        return f"{solution}{tokenizer.eos_token or ''}"
    return f"{PLAIN_ANSWER_DELIMITER}{solution.lstrip()}{tokenizer.eos_token or ''}"
