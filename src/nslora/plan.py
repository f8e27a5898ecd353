"""How much memory one training process will need, estimated before a run from the model's shapes.

The model is built on placeholders (`numerical.training.model_skeleton`: config.json only, no
weights), the LoRA adapter is attached by peft as in training, and the parameters are counted
exactly; activations are an estimate from the layer shapes and the batch settings (see
`activation_bytes`). Printed by `nslora plan`:

    estimate = training_memory(model_dir, params.model, params.lora, params.train, processes=8)
    print(estimate.table())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LoraParams, ModelConfig, TrainConfig
from .numerical.losses import chunk_rows

GIB = 1 << 30
NF4_BYTES = 0.5 + 4 / 64 / 4  # 4-bit weights plus a double-quantised absmax per block of 64
LORA_BYTES = 4 + 4 + 8        # float32 weight, its gradient, AdamW's two moments


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process holds at its peak, by part."""

    base_parameters: int
    lora_parameters: int
    base_weights: int          # frozen base model in its storage dtype (nf4 for quantised linears)
    lora_state: int            # LoRA weights, gradients and optimizer moments
    activations: int           # kept for the backward of one micro-batch
    loss: int                  # answer-position probabilities of the fused loss
    tokens_per_micro_batch: int
    dtype: str
    quantization: str
    gradient_checkpointing: bool

    @property
    def total(self) -> int:
        return self.base_weights + self.lora_state + self.activations + self.loss

    def table(self) -> str:
        rows = [
            ("base weights", self.base_weights,
             f"{self.base_parameters / 1e9:.2f}B parameters, {self.quantization if self.quantization != 'none' else self.dtype}"),
            ("LoRA state", self.lora_state, f"{self.lora_parameters / 1e6:.2f}M parameters: fp32 weights, grads, AdamW"),
            ("activations", self.activations, f"{self.tokens_per_micro_batch} tokens per micro-batch"
             + (", checkpointed" if self.gradient_checkpointing else "")),
            ("loss", self.loss, "answer-position probabilities"),
            ("total", self.total, "per training process, before allocator overhead"),
        ]
        return "\n".join(f"  {name:<13} {size / GIB:8.2f} GiB  {note}" for name, size, note in rows)


def tokens_per_micro_batch(train: TrainConfig, processes: int) -> int:
    """Padded tokens of the largest micro-batch a process runs: its share of a batch at full length,
    cut by `micro_batch_tokens` (at least one sample)."""
    share = math.ceil(train.batch_size / processes) * train.max_length
    if train.micro_batch_tokens:
        share = min(share, max(train.micro_batch_tokens, train.max_length))
    return share


def activation_bytes(config, tokens: int, length: int, element: int, checkpointing: bool,
                     eager_attention: bool) -> int:
    """Activations a decoder-only transformer keeps for its backward, per micro-batch.

    Per layer and token: about 10 hidden-sized tensors (the residual, the norms' outputs, q, the
    attention output, the projections' inputs and the LoRA branches' inputs) and 4 intermediate-
    sized ones (gate, up, the activation, their product); eager attention also keeps its scores and
    weights (heads x length^2 per sample). With checkpointing only each layer's input is kept, plus
    one layer's activations while it is recomputed.
    """
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    per_layer = tokens * (10 * hidden + 4 * intermediate) * element
    if eager_attention:
        per_layer += 2 * (tokens // length) * config.num_attention_heads * length * length * element
    if checkpointing:
        return layers * tokens * hidden * element + per_layer
    return layers * per_layer


def training_memory(model_dir: Path | str, model: ModelConfig, lora: LoraParams, train: TrainConfig,
                    processes: int = 1, device: torch.device | None = None) -> MemoryEstimate:
    """The memory one of `processes` data-parallel training processes needs for `model_dir` (a
    local HF directory, or a hub id whose config.json is reachable or in the HF cache)."""
    from peft import get_peft_model

    from .models import compute_device, resolve_dtype
    from .numerical.training import model_skeleton, peft_config

    device = device or compute_device()
    dtype = resolve_dtype(model.precision, device)
    element = torch.finfo(dtype).bits // 8
    skeleton = model_skeleton(model_dir, dtype=dtype)
    config = skeleton.config
    peft_model = get_peft_model(skeleton, peft_config(lora))
    lora_parameters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base_weights = base_parameters = 0
    # Count each tensor once: tied embeddings share one.
    seen: set[int] = set()
    head = skeleton.get_output_embeddings()
    for module in peft_model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            base_parameters += param.numel()
            # bitsandbytes quantises the decoder's linear layers; embeddings, norms and the LM head
            # stay in the compute dtype.
            quantised = (model.quantization == "nf4" and isinstance(module, torch.nn.Linear)
                         and module is not head and name == "weight")
            base_weights += param.numel() * (NF4_BYTES if quantised else element)
    tokens = tokens_per_micro_batch(train, processes)
    eager = device.type == "cpu" and model.attention in ("auto", "eager")
    activations = activation_bytes(config, tokens, train.max_length, element, train.gradient_checkpointing, eager)
    vocab = config.vocab_size
    loss = tokens * vocab * element + chunk_rows(vocab) * vocab * 4
    return MemoryEstimate(
        base_parameters=base_parameters, lora_parameters=lora_parameters, base_weights=int(base_weights),
        lora_state=lora_parameters * LORA_BYTES, activations=activations, loss=loss,
        tokens_per_micro_batch=tokens, dtype=str(dtype).replace("torch.", ""),
        quantization=model.quantization, gradient_checkpointing=train.gradient_checkpointing)
