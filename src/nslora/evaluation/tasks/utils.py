"""Prompt and answer functions of the nslora lm-eval task; the same code the trainer uses."""

from nslora import answers, prompts


def doc_to_text(doc: dict) -> str:
    return prompts.user_turn(doc["question"])


def doc_to_target(doc: dict) -> str:
    return answers.normalize(doc["final_answer"])


def _filter(extract, resps, docs):
    return [
        [answers.normalize(extract(r, answers.is_numeric(doc["final_answer"]))) for r in doc_resps]
        for doc_resps, doc in zip(resps, docs)
    ]


def strict_match_filter(resps, docs):
    return _filter(answers.strict_match, resps, docs)


def flexible_extract_filter(resps, docs):
    return _filter(answers.flexible_extract, resps, docs)
