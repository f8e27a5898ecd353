"""Per-sample gradient norms over the LoRA parameters, from the batch's own backward pass.

A LoRA factor is a bias-free linear map y = W x, so the gradient one sample contributes to W is
sum_t g_t x_t^T over that sample's tokens (x: the factor's input, g: dLoss/dy), materialised for
every sample with one batched matmul: cheap, because LoRA factors are thin (rank r on one side).
This gives every sample's ||grad L(x)|| from a single batched backward instead of one backward per
sample.

Plain LoRA linears (peft's `lora.Linear` without a variant such as DoRA) run as one fused autograd
function (`LoraLinear`): the base projection, the scaled low-rank update added in the same matmul,
and a backward that forms the per-sample factor gradients first and sums them into the batch
gradient. peft's module path costs ~20 small ops per layer and direction (casts, the scale multiply,
the add, hooks), which on a CPU took about a fifth of a SmolLM2 training step. Other LoRA layers keep
peft's forward and are measured by hooks.
"""

from __future__ import annotations

import types

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


def _squared_norms(per_sample: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(per_sample, dim=(1, 2), dtype=torch.float32).square()


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, with W and b frozen.

    Runs in the autocast dtype when autocast is on (the LoRA factors are cast to it, as autocast
    would), otherwise in the base weight's dtype. With a `tracker`, the backward adds every sample's
    squared gradient norm over A and B to it and sums the per-sample gradients into the batch
    gradient (no second contraction); without one it contracts over the whole batch at once.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling: float, tracker):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        same_input = x_lora is x  # no dropout: one cast of x, and one gradient for it
        with torch.autocast(device, enabled=False):
            x, weight = x.to(dtype), weight.to(dtype)
            x_lora = x if same_input else x_lora.to(dtype)
            a, scaled_b = lora_a.to(dtype), lora_b.to(dtype) * scaling
            y = nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
            u = x_lora @ a.T
            # The low-rank update is accumulated into the base output by the matmul itself.
            y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]), scaled_b.T)
        ctx.save_for_backward(x_lora, u, weight, a, scaled_b)
        ctx.scaling, ctx.tracker, ctx.same_input = scaling, tracker, same_input
        ctx.param_dtypes = lora_a.dtype, lora_b.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, u, weight, a, scaled_b = ctx.saved_tensors
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_y = grad_y.to(weight.dtype)
            rows = grad_y.reshape(-1, grad_y.shape[-1])
            grad_u = rows @ scaled_b                       # (tokens, r)
            grad_x = grad_x_lora = None
            if any(ctx.needs_input_grad[:2]):
                grad_x = rows @ weight
                if ctx.same_input:
                    grad_x.addmm_(grad_u, a)
                else:  # dropout between x and the LoRA branch
                    grad_x_lora = (grad_u @ a).view(x_lora.shape)
                grad_x = grad_x.view(*grad_y.shape[:-1], weight.shape[1])
            if ctx.tracker is not None:
                batch = grad_y.shape[0]
                per_a = torch.bmm(grad_u.view(batch, -1, grad_u.shape[-1]).transpose(1, 2),
                                  x_lora.reshape(batch, -1, x_lora.shape[-1]))
                # B's per-sample gradients transposed, (batch, r, out): the thin operand is the one
                # transposed, which the batched matmul takes without a copy.
                per_b = torch.bmm(u.reshape(batch, -1, u.shape[-1]).transpose(1, 2),
                                  grad_y.reshape(batch, -1, grad_y.shape[-1])).mul_(ctx.scaling)
                ctx.tracker.add(_squared_norms(per_a) + _squared_norms(per_b))
                grad_a = per_a.sum(dim=0, dtype=torch.float32)
                grad_b = per_b.sum(dim=0, dtype=torch.float32).T
            else:
                grad_a = grad_u.T @ x_lora.reshape(-1, x_lora.shape[-1])
                grad_b = (rows.T @ u.reshape(-1, u.shape[-1])).mul_(ctx.scaling)
        a_dtype, b_dtype = ctx.param_dtypes
        return grad_x, grad_x_lora, None, None, grad_a.to(a_dtype), grad_b.to(b_dtype), None, None


def _fusable(module: nn.Module) -> bool:
    """A peft lora.Linear over a frozen nn.Linear with one plain (vanilla, bias-free) adapter."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    if not isinstance(module, PeftLoraLinear) or type(module.base_layer) is not nn.Linear:
        return False
    if len(module.active_adapters) != 1 or module.fan_in_fan_out:
        return False
    name = module.active_adapters[0]
    return (name in module.lora_A and name not in module.lora_variant and module.lora_B[name].bias is None
            and not module.base_layer.weight.requires_grad)


def _fused_forward(tracker: "PerSampleGradNorms", peft_forward):
    def forward(self, x, *args, **kwargs):
        if (args or kwargs or not torch.is_grad_enabled() or self.merged or self.disable_adapters
                or len(self.active_adapters) != 1):
            return peft_forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        base = self.base_layer
        return LoraLinear.apply(x, self.lora_dropout[name](x), base.weight, base.bias,
                                self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                tracker if tracker.recording else None)

    return forward


class PerSampleGradNorms:
    """Accumulates squared per-sample gradient norms of the LoRA factors during backward passes.

    Constructing it routes the model's plain LoRA linears through `LoraLinear` (for good: the
    trainer that owns the tracker trains through it); the rest are measured with hooks while
    recording.

    Usage:
        with PerSampleGradNorms(model) as tracker:
            loss.backward()
        norms = tracker.norms(scale)   # (batch,) tensor

    `scale` undoes the factor the batch loss applied to each sample's loss (e.g. 1/batch for a
    mean), so the result is the norm of the gradient of that sample's own loss.
    """

    def __init__(self, model: nn.Module):
        self.recording = False
        fused = [m for m in model.modules() if _fusable(m)]
        for module in fused:
            # peft's own forward, kept once: a later tracker on the same model replaces this one.
            peft_forward = module.__dict__.setdefault("_nslora_peft_forward", module.forward)
            module.forward = types.MethodType(_fused_forward(self, peft_forward), module)
        fused_factors = {id(f[n]) for m in fused for f in (m.lora_A, m.lora_B) for n in f}
        self.layers = [layer for layer in lora_linears(model) if id(layer) not in fused_factors]
        if not fused and not self.layers:
            raise ValueError("PerSampleGradNorms: the model has no trainable LoRA layers")
        self._handles: list = []
        self._sq: torch.Tensor | None = None

    def add(self, sq: torch.Tensor) -> None:
        self._sq = sq if self._sq is None else self._sq + sq

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = inputs[0].detach()

        def on_grad(g: torch.Tensor) -> None:
            # In the compute dtype: the contraction accumulates in float32 inside the matmul, and
            # upcasting both operands first cost ~10% of a bf16 training step in copies.
            self.add(_squared_norms(torch.einsum("b...o,b...i->boi", g, x.to(g.dtype))))

        output.register_hook(on_grad)

    def __enter__(self) -> "PerSampleGradNorms":
        self._sq = None
        self.recording = True
        self._handles = [layer.register_forward_hook(self._forward_hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        self.recording = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def norms(self, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self._sq is None:
            raise RuntimeError("PerSampleGradNorms.norms: no backward pass was recorded")
        return self._sq.sqrt() / scale
