"""Materialising and loading base models: a hub or local checkpoint keeps its own dtype (bf16 for
most hub models, half the disk of float32), every stage casts to its compute precision when it loads,
each process loads onto its own GPU, and a fresh adapter needs the base model's shapes only."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nslora.attention import GROUPED_EAGER, resolve
from nslora.config import LoraParams, TrainConfig
from nslora.models import base_load_kwargs, compute_device, materialize, resolve_dtype
from nslora.numerical.training import init_adapter, load_model, seed_everything
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


# ---------------------------------------------------------------- GPU-ready loading, on a CPU
# CUDA capabilities are mocked: these check which dtype, device and loading path each GPU gets.

def mock_cuda(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_a_gpu_is_bf16_or_else_fp16(monkeypatch, bf16, expected):
    mock_cuda(monkeypatch, bf16)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


def test_each_process_loads_onto_its_own_gpu(monkeypatch):
    mock_cuda(monkeypatch, True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    device = compute_device()
    assert device == torch.device("cuda", 3)
    assert base_load_kwargs(torch.bfloat16, device) == {"dtype": torch.bfloat16, "device_map": {"": 3}}
    # Attention 'auto' on a GPU is sdpa (the CPU kernels are registered for CPUs only).
    assert resolve("auto", device, GROUPED_EAGER) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu")
    assert base_load_kwargs(torch.float32, torch.device("cpu")) == {"dtype": torch.float32}


def test_a_4bit_base_is_loaded_through_bitsandbytes(monkeypatch):
    pytest.importorskip("bitsandbytes")
    mock_cuda(monkeypatch, True)
    kwargs = base_load_kwargs(torch.bfloat16, torch.device("cuda", 1), "nf4")
    config = kwargs["quantization_config"]
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype) == (
        True, "nf4", torch.bfloat16)
    assert kwargs["device_map"] == {"": 1}


def test_a_4bit_base_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"nslora\[qlora\]"):
        base_load_kwargs(torch.float32, torch.device("cpu"), "nf4")


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_a_fresh_adapter_reads_no_weights_and_equals_one_built_on_the_loaded_model(tmp_path, examples, adapter):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    full = build_tiny_model(tmp_path / "full")
    shapes_only = tmp_path / "config_only"  # config and tokenizer, no model.safetensors
    shutil.copytree(full, shapes_only, ignore=shutil.ignore_patterns("*.safetensors"))
    lora, train = LoraParams(r=4, alpha=8), TrainConfig(seed=5)
    out = init_adapter(shapes_only, examples(6), lora, train, tmp_path / "epoch_0", adapter)

    seed_everything(train.seed)
    config = (PrefixTuningConfig(num_virtual_tokens=lora.prefix_tokens, task_type="CAUSAL_LM") if adapter == "prefix"
              else LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                              task_type="CAUSAL_LM"))
    expected = get_peft_model_state_dict(get_peft_model(load_model(full), config))
    written = load_file(str(out / "adapter_model.safetensors"))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
