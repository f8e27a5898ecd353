"""How a question becomes model input — one definition for training, evaluation and the student.

The user turn follows lm-eval's `gsm8k_cot_zeroshot` ("Q: ...\\nA: Let's think step by step.") and
is wrapped by the model's own chat template with the global system prompt. Models without a chat
template (base models such as Gemma 3 270M) get a plain-text layout instead.
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


def plain_prompt(system_prompt: str, question: str) -> str:
    """Prompt layout for models without a chat template."""
    head = f"{system_prompt.strip()}\n\n" if system_prompt else ""
    return f"{head}{user_turn(question)}\n"


def prompt_text(tokenizer, system_prompt: str, question: str) -> str:
    """The exact text the model is conditioned on before it answers."""
    if not has_chat_template(tokenizer):
        return plain_prompt(system_prompt, question)
    return tokenizer.apply_chat_template(
        messages(system_prompt, question), tokenize=False, add_generation_prompt=True
    )


def answer_text(tokenizer, system_prompt: str, question: str, solution: str) -> str:
    """The text that follows `prompt_text` in a training sample, including the end-of-turn marker.

    Taken from the chat template's rendering of the whole conversation, so the model learns to end
    its turn exactly the way the template (and generation's stop strings) expect.
    """
    prompt = prompt_text(tokenizer, system_prompt, question)
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(
            messages(system_prompt, question) + [{"role": "assistant", "content": solution}],
            tokenize=False,
        )
        if full.startswith(prompt) and solution in full[len(prompt):]:
            return full[len(prompt):]
    return f"{solution}{tokenizer.eos_token or ''}"
