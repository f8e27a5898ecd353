"""Symbolic update of one epoch: rewrite the questions the student gets wrong (and the system prompt).

For every selected sample the student answered incorrectly, a rewriter proposes a new question, the
proposal is checked (`check_rewrite`: length, numbers kept, answer not leaked, on topic), the student
is asked again, and this repeats until its final answer is correct or `max_iters` proposals were
made. The last proposal that passed the checks replaces the question; the gold solution and answer
never change.

  checks.py         the rewrite checks (and MiniLM similarity for the off-topic one)
  rewriters.py      the interface (`Sample` -> `Proposal`) and the offline `HintRewriter`
  textgrad.py       `TextGradRewriter`: the teacher's critique as the loss, one TGD step per proposal
  system_prompt.py  two-stage's initial prompt and NS-LoRA + system prompt's end-of-epoch update
  epoch.py          `rewrite_epoch`: the selected samples in parallel, within the teacher's budget

    rewriter = TextGradRewriter(teacher, student)            # or HintRewriter()
    result = rewrite_epoch(train, selection, rewriter, student, epoch=2, cfg=params.symbolic,
                           concurrency=params.teacher.concurrency, engine_name="openai:gpt-4o")
    write_table(result.train, "data/train/epoch_2.parquet", EXAMPLES)
    write_table(result.log, "data/rewrites/epoch_2.parquet", REWRITES)

Teacher failures never crash an epoch: they end that sample's rewrite with a reason code
('no_improved_variable_tags', 'teacher_error: ...'). The teacher's budget is reserved per sample in
id order before it starts (a whole attempt each); samples the budget cannot fund keep their
questions, and the outcome is the same at any concurrency and after a kill and resume.
"""

from ..methods import rewrites_questions
from .checks import check_proposal, check_rewrite, minilm_similarity, numbers
from .epoch import EpochRewrite, rewrite_epoch
from .rewriters import HintRewriter, Proposal, Rewriter, Sample, sample_from_row, solution_steps
from .system_prompt import optimize_initial_prompt, update_system_prompt
from .textgrad import CritiqueOnly, TextGradRewriter, call_kind

__all__ = ["CritiqueOnly", "EpochRewrite", "HintRewriter", "Proposal", "Rewriter", "Sample", "TextGradRewriter",
           "call_kind", "check_proposal", "check_rewrite", "minilm_similarity", "numbers",
           "optimize_initial_prompt", "rewrite_epoch", "sample_from_row", "solution_steps",
           "update_system_prompt", "make_rewriter"]


def make_rewriter(method: str, teacher, student, cfg):
    """The rewriter of `method`: hints from the gold solution without a teacher, TextGrad with one;
    for methods that never rewrite questions, only TextGrad's critiques (for the system prompt).
    (Here rather than in methods.py: every stage imports methods, and only the symbolic ones may
    depend on this package.)"""
    if teacher is None:
        return HintRewriter()
    rewriter = TextGradRewriter(teacher, student, cfg)
    return rewriter if rewrites_questions(method) else CritiqueOnly(rewriter)
