"""CPU attention kernels registered with transformers: `grouped_eager` for training and
`nslora_decode` for evaluation's decoding steps.

`grouped_eager`: eager attention for CPU training.

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

`nslora_decode`: the same computation for a decoding step's one query per row, reading a cache's
whole buffers where keys and values carry them (`evaluation.generation.TransposedKeysLayer`);
everything else goes to transformers' sdpa.

    attn_implementation = resolve(attention, device, GROUPED_EAGER)   # registers the kernel on a CPU
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .models import resolve_attention

GROUPED_EAGER = "grouped_eager"
DECODE = "nslora_decode"


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


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """Attention for CPU decoding: a step's one query per row through `grouped_eager_attention`
    (two batched matmuls, keys and values read in place). sdpa's CPU kernel is slow at this shape:
    inside a Qwen2.5-0.5B step at 64 rows and 369 positions 1.8 ms per layer, against ~1.3 here;
    SmolLM2's decoding ran ~14% faster overall. Scores round to bf16 before the softmax, as in
    transformers' eager attention (sdpa keeps them float32). Keys and values that carry `.buffer`
    are attended over their whole buffers, the spare columns masked: a CPU batched matmul copies a
    view of a longer buffer first, which cost more than the products."""
    if query.shape[2] != 1 or kwargs.get("softcap") is not None or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_len = key.shape[2]
    if getattr(key, "buffer", None) is not None and getattr(value, "buffer", None) is not None:
        key, value = key.buffer.transpose(2, 3), value.buffer
    output, _ = grouped_eager_attention(module, query, key, value, _decode_mask(attention_mask, kv_len, key, query),
                                        scaling=scaling)
    return output, None


def _decode_mask(attention_mask: torch.Tensor | None, kv_len: int, key: torch.Tensor,
                 query: torch.Tensor) -> torch.Tensor | None:
    """An additive (batch, 1, 1, width) mask over `key`'s columns: sdpa's mask (boolean, True attends,
    or additive) on the first `kv_len`, -inf on the spare ones. Built by a step's first layer and
    kept on the mask object, which every layer of the forward shares (a fill and a masked_fill per
    layer cost ~2% of a step)."""
    width = key.shape[2]
    if attention_mask is None and width == kv_len:
        return None
    kept = getattr(attention_mask, "decode_mask", None)
    if kept is not None and kept.shape[-1] == width:
        return kept
    mask = query.new_full((query.shape[0], 1, 1, width), float("-inf"))
    if attention_mask is None:
        mask[..., :kv_len] = 0
    elif attention_mask.dtype == torch.bool:
        mask[..., :kv_len].masked_fill_(attention_mask[..., -1:, :kv_len], 0)
    else:
        mask[..., :kv_len] = attention_mask[..., -1:, :kv_len]
    if attention_mask is not None:
        attention_mask.decode_mask = mask
    return mask


def resolve(attention: str, device: torch.device, cpu_kernel: str) -> str:
    """The attention kernel for `model.attention`: 'auto' on a CPU is `cpu_kernel` (GROUPED_EAGER for
    training, DECODE for evaluation), registered here; anything else as `models.resolve_attention`."""
    if attention == "auto" and device.type == "cpu":
        return register(cpu_kernel)
    return resolve_attention(attention)


@functools.cache
def register(name: str) -> str:
    """Make `attn_implementation=name` (GROUPED_EAGER or DECODE) available to transformers (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    function, mask = {GROUPED_EAGER: (grouped_eager_attention, eager_mask), DECODE: (decode_attention, sdpa_mask)}[name]
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, mask)
    return name
