"""Materialising base models: a hub or local checkpoint keeps its own dtype (bf16 for most hub
models, half the disk of float32), and every stage casts to its compute precision when it loads."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nslora.models import materialize
from nslora.numerical.training import load_model
from tiny import build_tiny_model


def stored_dtypes(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}


def test_a_checkpoint_is_materialised_in_its_own_dtype(tmp_path):
    fp32 = build_tiny_model(tmp_path / "fp32")
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((fp32 / name).read_bytes())

    assert stored_dtypes(materialize(str(fp32), tmp_path / "base_fp32")) == {"F32"}
    base = materialize(str(bf16), tmp_path / "base_bf16")
    assert stored_dtypes(base) == {"BF16"}
    # Training in float32 over a bf16 checkpoint: the weights are cast at load, exactly.
    model = load_model(base, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight.float())
