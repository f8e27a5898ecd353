"""Per-sample gradient norms over the LoRA parameters, from the batch's own backward pass.

A LoRA factor is a bias-free linear map y = W x, so the gradient one sample contributes to W is
sum_t g_t x_t^T over that sample's tokens (x: the factor's input, g: dLoss/dy). Hooks capture x on
the forward pass and g on the backward pass, and the per-sample gradient of every factor is
materialised with one einsum: cheap, because LoRA factors are thin (rank r on one side). This gives
every sample's ||grad L(x)|| from a single batched backward instead of one backward per sample.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_linears(model: nn.Module) -> list[nn.Linear]:
    """The trainable LoRA factor layers (lora_A / lora_B of every adapted module)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                for factor in (module.lora_A, module.lora_B):
                    if name in factor and factor[name].weight.requires_grad:
                        found.append(factor[name])
    return found


class PerSampleGradNorms:
    """Context manager accumulating squared per-sample gradient norms of LoRA factors.

    Usage:
        with PerSampleGradNorms(model) as tracker:
            loss.backward()
        norms = tracker.norms(scale)   # (batch,) tensor

    `scale` undoes the factor the batch loss applied to each sample's loss (e.g. 1/batch for a
    mean), so the result is the norm of the gradient of that sample's own loss.
    """

    def __init__(self, model: nn.Module):
        self.layers = lora_linears(model)
        if not self.layers:
            raise ValueError("PerSampleGradNorms: the model has no trainable LoRA layers")
        self._handles: list = []
        self._sq: torch.Tensor | None = None

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = inputs[0].detach()

        def on_grad(g: torch.Tensor) -> None:
            # In the compute dtype: the contraction accumulates in float32 inside the matmul, and
            # upcasting both operands first cost ~10% of a bf16 training step in copies.
            per_sample = torch.einsum("b...o,b...i->boi", g, x.to(g.dtype))
            sq = per_sample.float().pow(2).sum(dim=(1, 2))
            self._sq = sq if self._sq is None else self._sq + sq

        output.register_hook(on_grad)

    def __enter__(self) -> "PerSampleGradNorms":
        self._sq = None
        self._handles = [layer.register_forward_hook(self._forward_hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def norms(self, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self._sq is None:
            raise RuntimeError("PerSampleGradNorms.norms: no backward pass was recorded")
        return self._sq.sqrt() / scale
