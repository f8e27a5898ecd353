"""Answer-only causal-LM loss that never materialises the full logits tensor.

The vocabulary projection is the largest tensor of a naive loss (batch x length x vocab floats, e.g.
8 x 256 x 49152 x 4 bytes = 400 MB for SmolLM2) and its float32 softmax dominated the step time on a
CPU. Here logits exist only at answer positions, the float32 softmax runs a few rows at a time, and
only the probabilities are kept, in the compute dtype, for the backward pass.
"""

from __future__ import annotations

import torch
from torch import nn

# The float32 softmax runs over a few MB of rows at a time, so its temporary stays in cache: over a
# whole 256-row chunk of SmolLM2's 49k vocabulary (50 MB) the softmax and its copies ran at a fifth
# of memory speed, while at 1 MB a row of Qwen2.5's 152k vocabulary made a chunk, run by one thread.
CHUNK_BYTES = 4 << 20


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class Workspace:
    """One reusable buffer for the probabilities of the micro-batch between its forward and backward.

    They are rows x vocabulary (174 MB for 572 answer rows of Qwen2.5's 152k vocabulary), above
    glibc's mmap threshold, so a fresh tensor is mapped and page-faulted in, zero-filled, on every
    micro-batch (~45 ms of a 2.9 s Qwen2.5-0.5B step). While a forward awaits its backward the buffer
    is taken and another forward gets a fresh tensor, so nothing saved for a backward is overwritten.
    """

    def __init__(self):
        self._buffer: torch.Tensor | None = None
        self.taken = False

    def take(self, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        if self.taken:
            return like.new_empty((rows, columns))
        buffer = self._buffer
        if buffer is None or buffer.numel() < rows * columns or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffer = like.new_empty(rows * columns)
        self.taken = True
        return buffer[:rows * columns].view(rows, columns)

    def give_back(self) -> None:
        self.taken = False


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against `targets`, per row.

    The vocabulary matmul runs once over all rows in each direction: a frozen bf16 weight is re-laid
    out for the CPU's matmul kernel on every call (56 MB for SmolLM2), which made 85-row calls ~1.5x
    slower per row than 256-row ones. Only the softmax probabilities are kept for the backward
    pass, in the weight's dtype, written over the logits: no logits or probability temporaries.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                workspace: Workspace | None = None) -> torch.Tensor:
        hidden = hidden.to(weight.dtype)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            # The logits, overwritten below by the probabilities.
            out = None if workspace is None else workspace.take(hidden.shape[0], weight.shape[0], weight)
            probs = torch.mm(hidden, weight.T, out=out)
            target_logits = probs.gather(1, targets[:, None]).squeeze(1).float()
            step = chunk_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], step):
                rows = slice(start, start + step)
                # .float() first: softmax(dtype=float32) of a bf16 input is a slow path on CPU.
                p = torch.softmax(probs[rows].float(), dim=-1)
                # log-sum-exp from the softmax itself: the largest probability is exp(max - lse), at
                # least 1/vocab, so lse = max - log(p_max) stays exact where the target's own
                # probability would underflow (fused log_softmax is several times slower on CPU).
                lse = probs[rows].amax(dim=-1).float() - p.amax(dim=-1).log()
                losses[rows] = lse - target_logits[rows]
                probs[rows] = p
        ctx.save_for_backward(hidden, weight, targets, probs)
        ctx.workspace = workspace
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, targets, probs = ctx.saved_tensors
        # d loss_i / d logits_i = softmax_i - onehot(target_i), scaled by the incoming gradient; the
        # scale is applied to the (rows x hidden) products, not in a pass over the probabilities.
        grad_logits = probs
        grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
        scale = grad_losses[:, None].to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden = (grad_logits @ weight).mul_(scale)
            grad_weight = grad_logits.T @ (hidden * scale) if ctx.needs_input_grad[1] else None
        if ctx.workspace is not None:
            ctx.workspace.give_back()
        return grad_hidden, grad_weight, None, None


class AnswerLoss(nn.Module):
    """Per-sample mean cross-entropy over answer tokens only (prompt and padding are ignored)."""

    def __init__(self, model: nn.Module, through_peft: bool = False):
        """`through_peft`: run the peft model's own forward (prefix-tuning injects its virtual tokens
        there); otherwise the decoder is called directly and logits exist only at answer positions."""
        super().__init__()
        self.model = model
        self.through_peft = through_peft
        self.workspace = Workspace()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_mask: torch.Tensor) -> torch.Tensor:
        # Position t predicts token t+1: an answer token's loss is read at the position before it.
        target_mask = answer_mask[:, 1:]
        targets = input_ids[:, 1:][target_mask]
        if self.through_peft:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            token_loss = nn.functional.cross_entropy(logits[:, :-1][target_mask].float(), targets, reduction="none")
            return self._per_sample(token_loss, target_mask, input_ids.shape[0])
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state
        picked = hidden[:, :-1][target_mask]
        if self.softcap or getattr(self.lm_head, "bias", None) is not None:
            logits = self.lm_head(picked).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            token_loss = nn.functional.cross_entropy(logits, targets, reduction="none")
        else:
            # The workspace only serves passes that will run a backward (training).
            workspace = self.workspace if torch.is_grad_enabled() else None
            token_loss = LinearCrossEntropy.apply(picked, self.lm_head.weight, targets, workspace)
        return self._per_sample(token_loss, target_mask, input_ids.shape[0])

    @staticmethod
    def _per_sample(token_loss: torch.Tensor, target_mask: torch.Tensor, batch: int) -> torch.Tensor:
        rows = target_mask.nonzero()[:, 0]
        total = torch.zeros(batch, device=token_loss.device).index_add(0, rows, token_loss)
        return total / target_mask.sum(dim=1).clamp(min=1)
