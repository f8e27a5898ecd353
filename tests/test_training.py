"""LoRA epochs on a tiny random Llama: exact resume, per-sample statistics, batch plan."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import ctypes
import ctypes.util
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_tiny_model

from nslora.config import LoraParams, TrainConfig
from nslora.schemas import SAMPLE_STATS, to_table
from nslora.allocator import retain_freed_memory
from nslora.numerical.losses import AnswerLoss
from nslora.numerical.training import (BATCHES_FILE, STATE_FILE, LoraTrainer, TrainingDataError, collate,
                             compose_batches, encode_all, init_adapter, load_training_state, rng_state,
                             set_rng_state)

LORA = LoraParams(r=4, alpha=8, dropout=0.1)
TRAIN = TrainConfig(lr=1e-2, batch_size=4, max_length=96, scheduler="cosine", warmup_steps=2,
                    schedule_epochs=3, seed=3)


def adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture
def epoch0(tiny_model_dir, examples, tmp_path):
    train_df = examples(18)
    return train_df, init_adapter(tiny_model_dir, train_df, LORA, TRAIN, tmp_path / "epoch_0")


# bf16 is what `precision: auto` picks on this CPU and on GPUs. Staged and continuous runs do the
# same operations in the same order, so they agree as closely in bf16 as in fp32.
PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])


@PRECISIONS
def test_two_stages_equal_one_continuous_run(tiny_model_dir, epoch0, tmp_path, precision):
    """N epochs as N stages must train exactly like N epochs in one process (dropout on)."""
    train_df, e0 = epoch0
    trainer = LoraTrainer(tiny_model_dir, e0, TRAIN, precision=precision)
    stats_continuous = [trainer.run_epoch(train_df, 1, progress=False), trainer.run_epoch(train_df, 2, progress=False)]
    trainer.save(tmp_path / "continuous", epoch=2, train_df=train_df)

    staged = LoraTrainer(tiny_model_dir, e0, TRAIN, precision=precision)
    stats_staged = [staged.run_epoch(train_df, 1, progress=False)]
    staged.save(tmp_path / "epoch_1", epoch=1, train_df=train_df)
    staged = LoraTrainer(tiny_model_dir, tmp_path / "epoch_1", TRAIN, precision=precision)
    stats_staged.append(staged.run_epoch(train_df, 2, progress=False))
    staged.save(tmp_path / "epoch_2", epoch=2, train_df=train_df)

    a, b = adapter_weights(tmp_path / "continuous"), adapter_weights(tmp_path / "epoch_2")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # Training actually moved the weights away from the initial adapter.
    init = adapter_weights(e0)
    assert any((a[k] - init[k]).abs().max() > 1e-3 for k in a)
    for x, y in zip(stats_continuous, stats_staged):
        assert x[["id", "batch_index"]].equals(y[["id", "batch_index"]])
        torch.testing.assert_close(torch.tensor(x["loss"].values), torch.tensor(y["loss"].values))
    meta = json.loads((tmp_path / "epoch_2" / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 2 * 5 and meta["seed"] == 3


def test_same_batches_replayed_every_epoch(tiny_model_dir, epoch0):
    train_df, e0 = epoch0
    plan = json.loads((e0 / BATCHES_FILE).read_text())
    assert sorted(i for b in plan for i in b) == sorted(train_df["id"])
    trainer = LoraTrainer(tiny_model_dir, e0, TRAIN, precision="fp32")
    first = trainer.run_epoch(train_df, 1, progress=False)
    second = trainer.run_epoch(train_df, 2, progress=False)
    for stats in (first, second):
        batches = stats.groupby("batch_index")["id"].apply(sorted).tolist()
        assert batches == [sorted(b) for b in plan]
    to_table(first, SAMPLE_STATS)  # the statistics fit their named schema
    assert (second["loss"].mean() < first["loss"].mean())


@pytest.mark.parametrize("precision, rel, quantization, checkpointing", [
    ("fp32", 1e-4, "none", False),
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); the batched pass pads and reduces in
    # another order than a lone sample, so the norms agree to a few percent, not to fp32's 1e-4.
    ("bf16", 3e-2, "none", False),
    # fp16 trains with a loss scaler: the recorded norms are of the unscaled losses.
    ("fp16", 3e-2, "none", False),
    # Recomputed activations: each sample's gradient is still seen exactly once.
    ("fp32", 1e-4, "none", True),
    # A 4-bit base (bitsandbytes) runs peft's own LoRA layers, measured by hooks.
    pytest.param("fp32", 1e-4, "nf4", False, marks=pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")),
])
def test_recorded_grad_norm_equals_single_sample_backward(tiny_model_dir, examples, tmp_path, precision, rel,
                                                          quantization, checkpointing):
    """The per-sample norm from the batched pass equals a separate backward of that sample alone."""
    if quantization == "nf4":  # bitsandbytes quantizes in blocks of 64 inputs: wider layers
        tiny_model_dir = build_tiny_model(tmp_path / "tiny_128", hidden=128)
    train_df = examples(8)
    train = TrainConfig(batch_size=4, max_length=96, seed=1, max_grad_norm=0.0,
                        gradient_checkpointing=checkpointing)
    e0 = init_adapter(tiny_model_dir, train_df, LoraParams(r=4, alpha=8, dropout=0.0), train, tmp_path / "e0")
    # Make lora_B non-zero so both LoRA factors get gradients.
    weights = adapter_weights(e0)
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file({k: torch.randn_like(v) * 0.1 for k, v in weights.items()}, str(e0 / "adapter_model.safetensors"))

    reference = LoraTrainer(tiny_model_dir, e0, dataclasses.replace(train, gradient_checkpointing=False),
                            precision=precision, record_grad_norms=False, quantization=quantization)
    samples = encode_all(reference.tokenizer, train_df, train.max_length)
    # bitsandbytes' CPU kernels round differently by mode and shape (~0.3%), so with a 4-bit base
    # each sample's own gradient is taken in training mode, within the batch it trains in: its loss
    # alone, backpropagated through the batched forward.
    reference.model.train()
    groups = ([[samples[i] for i in reference.batches[0]]] if quantization == "nf4"
              else [[sample] for sample in samples.values()])
    expected = {}
    for group in groups:
        batch = collate(group, reference.tokenizer.pad_token_id)
        # The same autocast the trainer runs its forward in (LoRA weights fp32 over a bf16 base).
        with torch.autocast("cpu", dtype=reference.dtype, enabled=reference.dtype != torch.float32):
            # Full logits and plain cross-entropy (the fused loss's backward runs once per graph).
            losses = AnswerLoss(reference.model, through_peft=len(group) > 1)(**batch)
        for index, sample in enumerate(group):
            reference.optimizer.zero_grad(set_to_none=True)
            losses[index].backward(retain_graph=True)
            grads = [p.grad.flatten() for p in reference.model.parameters() if p.grad is not None]
            expected[sample.id] = torch.cat(grads).norm().item()

    trainer = LoraTrainer(tiny_model_dir, e0, train, precision=precision, quantization=quantization)
    assert trainer.model.is_activation_checkpointing == checkpointing
    linear_types = {type(m.base_layer).__name__ for m in trainer.model.modules() if hasattr(m, "lora_A")}
    assert linear_types == ({"Linear4bit"} if quantization == "nf4" else {"Linear"})
    stats = trainer.run_epoch(train_df, 1, progress=False)
    first_batch = stats[stats["batch_index"] == 0]
    assert len(first_batch) == 4
    for row in first_batch.itertuples():
        assert row.grad_norm == pytest.approx(expected[row.id], rel=rel)
        assert row.grad_norm > 0


def test_batches_group_lengths_and_are_deterministic():
    lengths = {f"s{i}": (i * 37) % 100 for i in range(64)}
    plan = compose_batches(lengths, 8, seed=5)
    assert plan == compose_batches(lengths, 8, seed=5)
    assert plan != compose_batches(lengths, 8, seed=6)
    grouped = sum(max(lengths[i] for i in b) * len(b) for b in plan)
    random_plan = compose_batches(lengths, 8, seed=5, group_by_length=False)
    padded_random = sum(max(lengths[i] for i in b) * len(b) for b in random_plan)
    assert grouped < padded_random


def test_missing_sample_names_the_id(tiny_model_dir, epoch0):
    train_df, e0 = epoch0
    trainer = LoraTrainer(tiny_model_dir, e0, TRAIN, precision="fp32")
    with pytest.raises(TrainingDataError, match="ex-train-0"):
        trainer.run_epoch(train_df.iloc[1:], 1, progress=False)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (_RunsCodeWhenUnpickled.ran.append, (True,))

    ran: list = []


def test_training_state_loads_without_unpickling_code(tmp_path):
    # A state file fetched from a remote is data: RNG states are tensors and numbers, and a file
    # carrying a pickled callable is refused, naming the file, without running it.
    torch.save({"optimizer": None, "step": 3, "rng": rng_state()}, tmp_path / STATE_FILE)
    state = load_training_state(tmp_path)
    assert state["step"] == 3
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    saved = rng_state()
    torch.rand(5)
    set_rng_state(saved)
    assert torch.equal(torch.rand(2), expected)

    torch.save({"step": 0, "rng": _RunsCodeWhenUnpickled()}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match=r"training_state\.pt: not a plain training state"):
        load_training_state(tmp_path)
    assert _RunsCodeWhenUnpickled.ran == []


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_freed_activations_stay_in_the_heap():
    """A 16 MB tensor (a step's attention weights are a few MB) comes from the heap, not from a
    fresh mmap that is unmapped on free and page-faulted back in on the next step."""
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError, TypeError):
        pytest.skip("glibc >= 2.33 (mallinfo2) is needed to read the allocator's mmapped bytes")
    mallinfo2.restype = _MallInfo2
    assert retain_freed_memory()
    before = mallinfo2().hblkhd
    block = torch.ones(16 << 20, dtype=torch.uint8)
    mmapped = mallinfo2().hblkhd - before
    del block
    assert mmapped < 16 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_full_logits_across_chunks(dtype, monkeypatch):
    import nslora.numerical.losses as losses

    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 97 * 3)  # 3 rows a chunk: 7 rows span 3 chunks
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 97, (7,), generator=gen)
    scale = torch.linspace(0.5, 2.0, 7)

    ours = losses.LinearCrossEntropy.apply(hidden, weight, targets)
    (ours * scale).sum().backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    (reference * scale).sum().backward()

    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ours, reference.detach(), **tol)
    torch.testing.assert_close(ours_grads[0], hidden.grad, **tol)
    torch.testing.assert_close(ours_grads[1], weight.grad, **tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_grouped_eager_attention_matches_transformers_eager(tiny_model_dir, dtype, tol):
    """Training's CPU attention computes what transformers' eager attention computes: same logits at
    every real position of a right-padded batch, same gradients (the tiny Llama has 2 query heads per
    key/value head). In bf16 the scale is rounded onto the queries and the softmax backward runs in
    bf16, hence the looser tolerance."""
    from transformers import AutoModelForCausalLM

    from nslora.numerical.training import load_model

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    results = []
    for model in (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation="eager"),
                  load_model(tiny_model_dir, dtype=dtype)):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float()[mask.bool()] ** 2).mean().backward()
        results.append((logits[mask.bool()].float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    assert load_model(tiny_model_dir).config._attn_implementation == "grouped_eager"
    (eager_logits, eager_grads), (ours_logits, ours_grads) = results
    torch.testing.assert_close(ours_logits, eager_logits, rtol=tol, atol=tol)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=tol, atol=tol * grad.abs().max().item())


@pytest.mark.parametrize("dropout, lora_bias", [(0.0, False), (0.2, False), (0.0, True)])
def test_fused_lora_linear_matches_peft(dropout, lora_bias):
    """The fused LoRA linear (installed by the per-sample tracker) gives peft's outputs and
    gradients, with a biased base layer (Qwen's q/k/v) and with dropout on the LoRA branch; its
    per-sample norms equal each sample's own backward. An adapter with a bias on B is not fused."""
    import copy

    from peft import LoraConfig, get_peft_model

    from nslora.numerical.persample import PerSampleGradNorms

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6, bias=False))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0", "2"],
                                                 lora_bias=lora_bias))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)  # make both factors get gradients
    fused_model = copy.deepcopy(peft_model)
    tracker = PerSampleGradNorms(fused_model)
    assert len(tracker.layers) == (4 if lora_bias else 0)  # hooked (peft's path) or fused
    x = torch.randn(3, 5, 12)

    def run(model, inputs, record=False):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks on both sides
        with tracker if record else contextlib.nullcontext():
            out = model(inputs)
            (out ** 2).sum(dim=(1, 2)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    ref_out, ref_grads = run(peft_model, x)
    out, grads = run(fused_model, x, record=True)
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) == (6 if lora_bias else 4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name])
    # A lone sample sees other dropout masks than inside the batch; the hooks measure factor
    # weights only, not a bias on B.
    if dropout == 0.0 and not lora_bias:
        norms = tracker.norms()
        for i in range(3):
            _, alone = run(peft_model, x[i:i + 1])
            expected = torch.cat([g.flatten() for g in alone.values()]).norm()
            torch.testing.assert_close(norms[i], expected)


def test_loss_workspace_never_overwrites_a_pending_backward():
    """Two forwards in flight: the second gets its own buffer, so both backwards see their own
    probabilities; once given back, the buffer serves the next forward."""
    from nslora.numerical.losses import LinearCrossEntropy, Workspace

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (5,), generator=gen)
    inputs = [torch.randn(5, 8, generator=gen, requires_grad=True) for _ in range(2)]
    workspace = Workspace()
    pending = [LinearCrossEntropy.apply(h, weight, targets, workspace) for h in inputs]
    for h, losses in zip(inputs, pending):
        losses.sum().backward()
        reference = h.detach().requires_grad_()
        torch.nn.functional.cross_entropy(reference @ weight.T, targets, reduction="sum").backward()
        torch.testing.assert_close(h.grad, reference.grad)
    assert not workspace.taken
    LinearCrossEntropy.apply(inputs[0], weight, targets, workspace)
    assert workspace.taken
