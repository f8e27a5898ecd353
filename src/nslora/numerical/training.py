"""Numerical updates: LoRA epochs that resume exactly and record per-sample statistics.

An adapter directory is the hand-off unit between epochs. Besides peft's files it holds
`training_state.pt` (optimizer, schedule step, RNG states), `batches.json` (the batch plan, composed
once before epoch 1 and replayed every epoch so per-sample losses compare fairly) and `meta.json`.
Because all state travels with the directory, N epochs run as N stages train exactly like N epochs
in one process.

    init_adapter(base_dir, train_df, lora, train, out_dir)          # epoch 0
    trainer = LoraTrainer(base_dir, "models/adapters/epoch_0", train, precision)
    stats = trainer.run_epoch(train_df, epoch=1)
    trainer.save("models/adapters/epoch_1", epoch=1, train_df=train_df)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import prompts
from ..config import LoraParams, TrainConfig, to_dict
from ..models import base_load_kwargs, load_tokenizer, model_source, resolve_dtype
from ..schemas import system_prompt_of
from ..allocator import retain_freed_memory
from ..attention import GROUPED_EAGER, resolve
from .losses import AnswerLoss
from .persample import PerSampleGradNorms

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
BATCHES_FILE = "batches.json"
META_FILE = "meta.json"


class TrainingDataError(ValueError):
    """Training data that does not fit the adapter's batch plan or the model's length budget."""


@dataclass(frozen=True)
class EncodedSample:
    id: str
    input_ids: list[int]
    prompt_tokens: int  # tokens before the answer; loss is taken on the rest

    @property
    def answer_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_tokens


def load_model(model_dir: Path | str, dtype: torch.dtype = torch.float32, attention: str = "auto",
               device: torch.device = torch.device("cpu"), quantization: str = "none"):
    """Load a materialised base model for training, straight onto `device`. Frozen base weights are
    stored in `dtype` (bf16 halves the memory and runs the big matmuls at bf16 speed), or in 4 bits
    with `quantization='nf4'`; LoRA weights stay float32.
    Attention 'auto' is sdpa, except on a CPU: there eager attention ran ~25% faster at these
    lengths than sdpa (whose CPU flash backward is slow in bf16), and `grouped_eager` (nslora.attention,
    the same computation with fewer passes over the scores) faster still."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation=resolve(attention, device, GROUPED_EAGER),
        **base_load_kwargs(dtype, device, quantization))


def model_skeleton(model_dir: Path | str, dtype: torch.dtype = torch.float32):
    """The base model's modules without its weights: every parameter is a zero-stride placeholder
    of the right shape and dtype on the CPU (no memory), enough for peft to build and initialise an
    adapter, and for counting parameters, but never for a forward pass. Reads config.json only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # peft creates adapter weights on the device of the layer they adapt: on the meta device they
    # would have no values. A placeholder on the CPU keeps them there. Tied weights (embeddings and
    # LM head) stay one parameter.
    placeholders: dict[int, tuple] = {}  # id -> (the meta parameter, kept so the id stays its; placeholder)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in placeholders:
                placeholders[id(param)] = param, torch.nn.Parameter(
                    torch.empty((), dtype=param.dtype).expand(param.shape), requires_grad=False)
            module._parameters[name] = placeholders[id(param)][1]
    return model


def encode(tokenizer, row, max_length: int) -> EncodedSample:
    """Tokenise one example as prompt + answer, cut to `max_length` tokens."""
    prompt = prompts.prompt_text(tokenizer, row.system_prompt, row.question)
    answer = prompts.answer_text(tokenizer, row.system_prompt, row.question, row.solution)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    return EncodedSample(id=str(row.id), input_ids=ids, prompt_tokens=min(len(prompt_ids), len(ids)))


def encode_all(tokenizer, train_df: pd.DataFrame, max_length: int) -> dict[str, EncodedSample]:
    samples = {s.id: s for s in (encode(tokenizer, row, max_length) for row in train_df.itertuples())}
    empty = [s.id for s in samples.values() if s.answer_tokens == 0]
    if empty:
        log.warning(
            "%d sample(s) have no answer tokens left within train.max_length=%d (first: %s); "
            "they are kept in the batch plan but contribute no loss. Raise train.max_length.",
            len(empty), max_length, ", ".join(empty[:3]),
        )
    return samples


def compose_batches(lengths: dict[str, int], batch_size: int, seed: int,
                    group_by_length: bool = True) -> list[list[str]]:
    """The batch plan: lists of sample ids, composed once and replayed every epoch.

    With `group_by_length`, samples are shuffled, cut into mega-batches of 16 batches, each sorted
    by length, then chunked: batches hold similar lengths (little padding) yet stay random.
    """
    rng = random.Random(seed)
    ids = sorted(lengths)
    rng.shuffle(ids)
    if group_by_length:
        mega = batch_size * 16
        ids = [i for start in range(0, len(ids), mega)
               for i in sorted(ids[start:start + mega], key=lambda i: -lengths[i])]
    batches = [ids[start:start + batch_size] for start in range(0, len(ids), batch_size)]
    rng.shuffle(batches)
    return batches


def split_micro_batches(batch: list[EncodedSample], max_tokens: int) -> list[list[EncodedSample]]:
    """Consecutive chunks of `batch` whose padded size (rows x longest) stays within `max_tokens`
    (at least one sample each); 0 keeps the batch whole. Gradients accumulate over the chunks, so
    the update is the batch's, with a fraction of its activation memory."""
    if not batch:
        return []
    if not max_tokens:
        return [batch]
    chunks: list[list[EncodedSample]] = []
    for sample in batch:
        current = chunks[-1] if chunks else None
        if current and (len(current) + 1) * max(len(s.input_ids) for s in current + [sample]) <= max_tokens:
            current.append(sample)
        else:
            chunks.append([sample])
    return chunks


def lr_factor(step: int, train: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based)."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.scheduler == "constant":
        return 1.0
    total = max(1, train.schedule_epochs * steps_per_epoch - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / total)
    if train.scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def collate(samples: list[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    answer = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        attention[row, :n] = 1
        answer[row, s.prompt_tokens:n] = True
    return {"input_ids": input_ids, "attention_mask": attention, "answer_mask": answer}


def data_hash(train_df: pd.DataFrame) -> str:
    """Content hash of what training reads (not of the Parquet bytes, which vary by writer)."""
    h = hashlib.sha256()
    for row in train_df.sort_values("id").itertuples():
        for value in (row.id, row.system_prompt, row.question, row.solution):
            h.update(str(value).encode())
            h.update(b"\x00")
    return h.hexdigest()


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers, so that `training_state.pt` (which travels
    through DVC remotes) loads with `torch.load(weights_only=True)`: no arbitrary unpickling."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(adapter_dir: Path) -> dict:
    """The optimizer, step and RNG states saved with an adapter, read without unpickling code."""
    import pickle

    path = Path(adapter_dir) / STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: not a plain training state (tensors and numbers only), so it is not "
                         f"loaded; it may come from an older nslora or elsewhere. Re-run the epoch that "
                         f"made it (dvc repro -f lora_epoch@k). ({str(err).splitlines()[0]})") from err


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_dir(out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def read_meta(adapter_dir: Path | str) -> dict:
    path = Path(adapter_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an nslora adapter directory (no {META_FILE})")
    return json.loads(path.read_text())


def peft_config(lora: LoraParams, adapter: str = "lora"):
    """peft's config of a fresh adapter: 'lora', or 'prefix' for the prefix-tuning baseline."""
    from peft import LoraConfig, PrefixTuningConfig

    if adapter == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=lora.prefix_tokens, task_type="CAUSAL_LM")
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def init_adapter(base_dir: Path | str, train_df: pd.DataFrame, lora: LoraParams,
                 train: TrainConfig, out_dir: Path | str, adapter: str = "lora") -> Path:
    """Epoch 0: a freshly initialised adapter ('lora', or 'prefix' for the prefix-tuning
    baseline), its batch plan and starting RNG state."""
    from peft import get_peft_model

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    seed_everything(train.seed)
    tokenizer = load_tokenizer(base_dir)
    # A fresh adapter needs the base model's shapes, not its weights (32 GB for an 8B model in
    # float32); float32 placeholders give the same adapter, bit for bit, as the loaded model did.
    model = get_peft_model(model_skeleton(base_dir), peft_config(lora, adapter))
    samples = encode_all(tokenizer, train_df, train.max_length)
    batches = compose_batches({i: len(s.input_ids) for i, s in samples.items()},
                              train.batch_size, train.seed, train.group_by_length)
    seed_everything(train.seed)
    tmp = _atomic_dir(out_dir)
    model.save_pretrained(tmp)
    (tmp / BATCHES_FILE).write_text(json.dumps(batches) + "\n")
    torch.save({"optimizer": None, "step": 0, "rng": rng_state()}, tmp / STATE_FILE)
    meta = {
        "epoch": 0,
        "base_model": {**model_source(base_dir), "dir": str(base_dir)},
        "seed": train.seed,
        "data_sha256": data_hash(train_df),
        "system_prompt": system_prompt_of(train_df),
        "adapter": adapter,
        "lora": to_dict(lora),
        "samples": len(samples),
        "batches": len(batches),
        "step": 0,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _publish(tmp, out_dir)
    return out_dir


def _record(sample: EncodedSample, epoch: int, batch_index: int, loss: float, grad_norm: float) -> dict:
    empty = sample.answer_tokens == 0  # cut off by max_length: no loss, no gradient
    return {"id": sample.id, "epoch": epoch, "batch_index": batch_index,
            "loss": float("nan") if empty else loss, "grad_norm": 0.0 if empty else grad_norm,
            "answer_tokens": sample.answer_tokens, "tokens": len(sample.input_ids)}


class LoraTrainer:
    """Continues training from an adapter directory, one epoch at a time.

    Args:
        base_dir: the materialised base model.
        adapter_dir: the adapter to continue from (epoch 0 from `init_adapter`, or a later epoch).
        train: training settings; must match the ones the adapter was started with.
        precision: 'auto' | 'bf16' | 'fp16' | 'fp32' (see ModelConfig.precision); fp16 trains with
            a loss scaler, whose state travels in training_state.pt like the optimizer's.
        attention: attention kernel (see ModelConfig.attention).
        quantization: 'none' | 'nf4' (see ModelConfig.quantization).
        record_grad_norms: record per-sample gradient norms (formed in the fused LoRA layers' backward).
    """

    def __init__(self, base_dir: Path | str, adapter_dir: Path | str, train: TrainConfig,
                 precision: str = "auto", record_grad_norms: bool = True, accelerator=None,
                 attention: str = "auto", quantization: str = "none"):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        from peft import PeftModel

        retain_freed_memory()  # activations are re-allocated every step: keep their pages mapped
        self.base_dir, self.adapter_dir, self.train = Path(base_dir), Path(adapter_dir), train
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout))])
        self.device = self.accelerator.device
        self.dtype = resolve_dtype(precision, self.device)
        # What `precision` resolved to ('bfloat16' / 'float32'): 'auto' differs between machines.
        self.precision = str(self.dtype).replace("torch.", "")
        self.meta = read_meta(adapter_dir)
        self.batches = json.loads((self.adapter_dir / BATCHES_FILE).read_text())
        state = load_training_state(self.adapter_dir)

        self.prefix = json.loads((self.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
        if self.prefix and quantization != "none":
            raise ValueError(f"model.quantization={quantization}: prefix-tuning (method=prefix) trains on an "
                             "unquantised base here; set model.quantization: none")
        self.quantization = quantization
        self.tokenizer = load_tokenizer(base_dir)
        base = load_model(base_dir, dtype=self.dtype, attention=attention, device=self.device,
                          quantization=quantization)
        if train.gradient_checkpointing:
            # Non-reentrant: it needs no gradient on the (frozen) embeddings' output, and the
            # per-sample statistics see each backward once (the recomputed forward builds no graph).
            base.activation_checkpointing_enable({"use_reentrant": False})
        # peft refuses to load prompt-learning adapters (prefix-tuning) as trainable; load those
        # frozen and unfreeze their prompt encoder, which is what is_trainable would do.
        self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=not self.prefix)
        if self.prefix:
            self.model.prompt_encoder.requires_grad_(True)
            self.model.train()
        if self.dtype != torch.float32:
            # Autocast runs the LoRA matmuls in bf16 anyway; peft's cast of every LoRA input to the
            # float32 adapter dtype would only add a full-size copy per adapted module.
            for module in self.model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        # Prefix-tuning (a baseline) runs through peft's forward, which injects the prefix; the
        # per-sample gradient-norm hooks are LoRA-specific, so that baseline records NaN.
        self.record_grad_norms = record_grad_norms and not self.prefix
        # Built once: it routes the LoRA layers through the fused function for this trainer's life.
        self.tracker = PerSampleGradNorms(self.model) if self.record_grad_norms else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        # fp16 overflows where bf16 does not: the loss is scaled up for the backward and the
        # gradients back down before clipping; a step with inf/nan gradients is skipped.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loss_module, self.optimizer = self.accelerator.prepare(
            AnswerLoss(self.model, through_peft=self.prefix), self.optimizer)
        # Restore RNG last: loading the model above consumed random numbers (LoRA layer init).
        set_rng_state(state["rng"])

    def run_epoch(self, train_df: pd.DataFrame, epoch: int, progress: bool = True) -> pd.DataFrame:
        """One pass over the batch plan. Returns per-sample statistics (schemas.SAMPLE_STATS)."""
        acc = self.accelerator
        samples = self._samples_in_plan(train_df)
        self.model.train()
        records: list[dict] = []
        tokens, start = 0, time.perf_counter()
        bar = tqdm(self.batches, desc=f"lora epoch {epoch}", disable=not (progress and acc.is_main_process))
        for batch_index, batch_ids in enumerate(bar):
            mine = [samples[i] for i in batch_ids[acc.process_index::acc.num_processes]]
            valid = sum(1 for i in batch_ids if samples[i].answer_tokens > 0)
            for group in self.optimizer.param_groups:
                group["lr"] = self.train.lr * lr_factor(self.step, self.train, len(self.batches))
            # Each process holds part of the batch and DDP averages gradients over processes, so
            # scale its loss sum to give the mean over all valid samples of the global batch.
            scale = acc.num_processes / max(valid, 1)
            micro_batches = split_micro_batches(mine, self.train.micro_batch_tokens)
            if not micro_batches:
                # A batch smaller than the process count (7,473 GSM8K samples in batches of 8 end
                # with one) leaves this process without a sample, yet the all-reduce of the others'
                # gradients waits for its backward: it runs one of the batch's samples at weight 0.
                self._forward_backward([samples[batch_ids[0]]], 0.0)
            for j, micro in enumerate(micro_batches):
                last = j == len(micro_batches) - 1
                with contextlib.nullcontext() if last else acc.no_sync(self.loss_module):
                    losses, norms = self._forward_backward(micro, scale)
                records += [_record(s, epoch, batch_index, l, g)
                            for s, l, g in zip(micro, losses.tolist(), norms.tolist())]
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.train.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens += sum(len(s.input_ids) for s in mine)
            if batch_index % 4 == 0 and mine:
                bar.set_postfix(loss=f"{np.nanmean([r['loss'] for r in records[-len(mine):]]):.3f}",
                                tok_s=f"{tokens * acc.num_processes / (time.perf_counter() - start):.0f}")
        stats = self._gather(records)
        self.seconds = time.perf_counter() - start
        self.tokens = int(stats["tokens"].sum())
        return stats

    def measure_losses(self, train_df: pd.DataFrame, epoch: int, progress: bool = True) -> pd.DataFrame:
        """Per-sample losses of the current adapter without training (grad_norm is NaN): the
        reference L_0 that the loss-change-ratio criterion compares epoch 1 against."""
        samples = self._samples_in_plan(train_df)
        self.model.eval()
        records = []
        acc = self.accelerator
        bar = tqdm(self.batches, desc=f"losses at epoch {epoch}", disable=not (progress and acc.is_main_process))
        with torch.no_grad():
            for batch_index, batch_ids in enumerate(bar):
                mine = [samples[i] for i in batch_ids[acc.process_index::acc.num_processes]]
                for micro in split_micro_batches(mine, self.train.micro_batch_tokens):
                    tensors = {k: v.to(self.device) for k, v in collate(micro, self.tokenizer.pad_token_id).items()}
                    with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                        losses = self.loss_module(**tensors).float().tolist()
                    records += [_record(s, epoch, batch_index, l, float("nan")) for s, l in zip(micro, losses)]
        return self._gather(records)

    def _samples_in_plan(self, train_df: pd.DataFrame) -> dict[str, EncodedSample]:
        samples = encode_all(self.tokenizer, train_df, self.train.max_length)
        planned = {i for batch in self.batches for i in batch}
        missing = sorted(planned - set(samples))
        if missing:
            raise TrainingDataError(
                f"training data lacks {len(missing)} sample id(s) of the batch plan "
                f"(first: {missing[0]}); the plan in {self.adapter_dir / BATCHES_FILE} was composed "
                "from the epoch-1 data and every later epoch must keep the same ids."
            )
        if len(samples) != len(planned):
            log.warning("%d sample(s) are not in the batch plan and are not trained on",
                        len(samples) - len(planned))
        return samples

    def _gather(self, records: list[dict]) -> pd.DataFrame:
        from accelerate.utils import gather_object

        if self.accelerator.num_processes > 1:
            records = gather_object(records)
        return pd.DataFrame(records).sort_values(["batch_index", "id"]).reset_index(drop=True)

    def _forward_backward(self, micro: list[EncodedSample], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradient of `scale * sum of per-sample losses`; return losses and norms."""
        tensors = {k: v.to(self.device) for k, v in collate(micro, self.tokenizer.pad_token_id).items()}
        tracker = self.tracker
        with tracker if tracker is not None else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                losses = self.loss_module(**tensors)
            has_answer = tensors["answer_mask"][:, 1:].any(dim=1)
            total = (losses * has_answer).sum() * scale
            if self.scaler is not None:
                total = self.scaler.scale(total)
                scale = scale * self.scaler.get_scale()
            self.accelerator.backward(total)
        norms = tracker.norms(scale) if tracker is not None else torch.full_like(losses, float("nan"))
        return losses.detach().float(), norms.detach()

    def save(self, out_dir: Path | str, epoch: int, train_df: pd.DataFrame, extra: dict | None = None) -> Path:
        """Write the adapter directory of `epoch` (main process only)."""
        out_dir = Path(out_dir)
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return out_dir
        tmp = _atomic_dir(out_dir)
        acc.unwrap_model(self.loss_module).model.save_pretrained(tmp)
        (tmp / BATCHES_FILE).write_text(json.dumps(self.batches) + "\n")
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "rng": rng_state(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None}, tmp / STATE_FILE)
        meta = {
            **self.meta,
            "epoch": epoch,
            "data_sha256": data_hash(train_df),
            "system_prompt": system_prompt_of(train_df),
            "step": self.step,
            "precision": self.precision,
            "quantization": self.quantization,
            "processes": acc.num_processes,
            "train": to_dict(self.train),
            **(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, out_dir)
        return out_dir


