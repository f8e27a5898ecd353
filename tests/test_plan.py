"""`nslora plan`: the memory estimate counts the parameters a run really has, and each memory
setting lowers the part it should."""

from __future__ import annotations

import dataclasses
import math

import yaml
from click.testing import CliRunner
from safetensors import safe_open

from nslora.config import LoraParams, ModelConfig, TrainConfig
from nslora.numerical.training import init_adapter
from nslora.plan import training_memory
from nslora_cli.main import cli

MODEL, LORA = ModelConfig(precision="bf16"), LoraParams(r=4, alpha=8)
TRAIN = TrainConfig(batch_size=8, max_length=96, micro_batch_tokens=0)


def stored_elements(path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def test_the_estimate_counts_the_checkpoint_and_the_adapter_exactly(tiny_model_dir, examples, tmp_path):
    estimate = training_memory(tiny_model_dir, MODEL, LORA, TRAIN)
    # Tied embeddings are one tensor in the checkpoint and one in the count.
    assert estimate.base_parameters == stored_elements(tiny_model_dir / "model.safetensors")
    assert estimate.base_weights == 2 * estimate.base_parameters  # bf16
    adapter = init_adapter(tiny_model_dir, examples(4), LORA, TRAIN, tmp_path / "epoch_0")
    assert estimate.lora_parameters == stored_elements(adapter / "adapter_model.safetensors")
    assert estimate.lora_state == 16 * estimate.lora_parameters


def test_each_memory_setting_lowers_its_part(tiny_model_dir):
    plain = training_memory(tiny_model_dir, MODEL, LORA, TRAIN)
    assert plain.tokens_per_micro_batch == 8 * 96
    checkpointed = training_memory(tiny_model_dir, MODEL, LORA, dataclasses.replace(TRAIN, gradient_checkpointing=True))
    assert checkpointed.activations < plain.activations
    split = training_memory(tiny_model_dir, MODEL, LORA, dataclasses.replace(TRAIN, micro_batch_tokens=192))
    assert split.tokens_per_micro_batch == 192 and split.activations < plain.activations
    two = training_memory(tiny_model_dir, MODEL, LORA, TRAIN, processes=2)
    assert two.tokens_per_micro_batch == 4 * 96
    nf4 = training_memory(tiny_model_dir, dataclasses.replace(MODEL, quantization="nf4"), LORA, TRAIN)
    assert nf4.base_parameters == plain.base_parameters and nf4.base_weights < plain.base_weights
    assert nf4.lora_state == plain.lora_state


def write_params(path, model_name):
    params = yaml.safe_load(open("params.yaml"))
    params["model"]["name"] = str(model_name)
    path.write_text(yaml.safe_dump(params))
    return path


def test_nslora_plan_prints_the_estimate(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["plan", "--params", str(write_params(tmp_path / "p.yaml", tiny_model_dir)),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1 training process(es)" in result.output
    for part in ("base weights", "LoRA state", "activations", "total"):
        assert part in result.output


def test_nslora_plan_names_a_model_it_cannot_read(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the hub
    result = CliRunner().invoke(cli, ["plan", "--params", str(write_params(tmp_path / "p.yaml", "no-such-org/no-such-model"))])
    assert result.exit_code == 1
    assert "model.name='no-such-org/no-such-model': cannot read its config.json" in result.output
