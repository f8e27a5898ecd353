"""Eager attention for CPU training, registered with transformers as `grouped_eager`.

The same computation as transformers' eager attention (scores, additive mask, softmax, weighted
values), with far fewer passes over the (heads x length x length) scores, which on a CPU cost more
than the attention matmuls (a pass over SmolLM2's 4 x 9 x 256 x 256 scores is ~1 ms, at memory
speed):
- the softmax runs on the bf16 scores: torch's CPU softmax computes in float32 internally and gives
  bit-identical weights to upcast-softmax-downcast, without the two copies each way (and
  `softmax(x, dtype=torch.float32)` on a bf16 input is a slow path, 5x a float32 softmax);
- the scale is applied to the queries and the mask added in place;
- the query heads that share a key/value head are stacked into one matrix, so keys and values are
  read in place instead of copied once per query head (and their gradients need no reduction).
The backward of the bf16 softmax rounds in bf16 (relative difference ~0.3% to the upcast one).

    register()   # once; then load with attn_implementation="grouped_eager"
"""

from __future__ import annotations

import functools

import torch
from torch import nn

NAME = "grouped_eager"


def grouped_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, softcap: float | None = None, **kwargs):
    """query (batch, heads, q_len, dim); key/value (batch, kv_heads, kv_len, dim). Returns the output
    (batch, q_len, heads, dim) and the attention weights (batch, heads, q_len, kv_len)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if scaling is None:
        scaling = dim ** -0.5
    stacked = (query * scaling).reshape(batch, kv_heads, groups * q_len, dim)
    scores = torch.matmul(stacked, key.transpose(2, 3))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
    if attention_mask is not None:
        scores.add_(attention_mask[:, :, None, :, :kv_len])
    weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.view(batch, kv_heads, groups * q_len, kv_len), value)
    output = output.view(batch, heads, q_len, dim).transpose(1, 2).contiguous()
    return output, weights.view(batch, heads, q_len, kv_len)


@functools.cache
def register() -> str:
    """Make `attn_implementation="grouped_eager"` available to transformers (once); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_eager_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
