"""`LocalEngine`: a transformers model in this process, batching concurrent calls, reusing prompt
prefixes' KV caches and decoding with int8 weight copies on a CPU.

    engine = LocalEngine("models/teacher", precision="auto", name="embedded:qwen2.5-coder-1.5b")
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import Completion, TeacherCallError


class Int8DecodeLinear(torch.nn.Module):
    """An `nn.Linear` that also keeps its weight as int8 (per output channel, symmetric) and uses it
    for calls of at most `max_rows` rows, i.e. decoding steps.

    Decoding a 1.5B model on a CPU is bound by reading the weights (~2.6 GB in bf16 per step); int8
    halves that, and torch's fused `_weight_int8pack_mm` decodes ~1.6x faster here. Prefill (many
    rows, compute-bound) keeps the model's weight, where that kernel is slower. Rounding differs from
    bf16 by ~1% per output, well below the GGUF's own 4-bit quantisation error.

    The kernel always runs on bf16 activations, also in a float32 model: its float32 variant is
    scalar (on a 2-core AVX2 CPU, 8 rows of a 1536x8960 layer: 155 ms against 20 ms for the
    float32 `nn.Linear`), while the bf16 one is vectorised there too (6 ms with the casts).
    """

    def __init__(self, linear: torch.nn.Linear, max_rows: int = 16):
        super().__init__()
        self.linear = linear
        self.max_rows = max_rows
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8), persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows or x.dtype not in (torch.bfloat16, torch.float32):
            return self.linear(x)
        flat = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale).to(x.dtype)
        if self.linear.bias is not None:
            out = out + self.linear.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def int8_decode_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model computing in `dtype` on `device` can decode through torch's int8 weight-only
    matmul on bf16 activations (a CPU kernel torch ships for weight-only quantised decoding; absent
    or different in some builds)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    try:
        torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8),
                                  torch.ones(8, dtype=torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def use_int8_decode(model: torch.nn.Module, max_rows: int = 16) -> None:
    """Wrap every `nn.Linear` of `model` in `Int8DecodeLinear`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8DecodeLinear(child, max_rows))


class GrammarLogits:
    """A logits processor keeping each row of a generated batch in its own grammar (llguidance:
    the regex of a `TaggedReply`, matched token by token); rows without one are left free.

    Each step it advances every row's matcher by the token the row just took, then masks the
    tokens that would leave the grammar. A row whose matcher has finished may only stop; one that
    has emitted a stop token is done (generate pads it from then on)."""

    def __init__(self, ll_tokenizer, grammars: list, prompt_width: int, stop_ids: list[int]):
        import llguidance
        import llguidance.torch as llt

        self.matchers = [None if g is None else llguidance.LLMatcher(
            ll_tokenizer, llguidance.grammar_from("regex", g.regex())) for g in grammars]
        self.vocab = ll_tokenizer.vocab_size
        self.bitmask = llt.allocate_token_bitmask(len(self.matchers), self.vocab)  # refilled every step
        self.width = prompt_width
        self.stop_ids = set(stop_ids)
        self.done = [m is None for m in self.matchers]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import llguidance.torch as llt

        rows = [i for i, done in enumerate(self.done) if not done]
        if not rows:
            return scores
        generated = input_ids.shape[1] > self.width
        bitmask = self.bitmask.fill_(-1)  # every token allowed
        for i in rows:
            matcher = self.matchers[i]
            if generated:
                token = int(input_ids[i, -1])
                if token in self.stop_ids:
                    self.done[i] = True
                    continue
                matcher.consume_token(token)
            if matcher.is_error():  # cannot happen under the mask; the checks judge the reply then
                self.done[i] = True
                continue
            llt.fill_next_token_bitmask(matcher, bitmask, i)
        llt.apply_token_bitmask_inplace(scores[:, :self.vocab], bitmask.to(scores.device))
        return scores


@dataclass
class _Pending:
    """One call waiting for a batch: its prompt tokens, its reply limit, its grammar (or None), and
    where the result goes."""

    ids: list[int]
    max_tokens: int
    grammar: object = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None


class LocalEngine:
    """A transformers causal LM in this process, batching the calls of concurrent threads.

    Greedy calls that arrive together (TextGrad on `teacher.concurrency` samples sends them in
    step) are generated as one left-padded batch: decoding a 1.5B model on a CPU is memory-bound,
    so a step for 4 or 8 sequences costs little more than for one, while prefill is compute-bound
    either way. Each prompt is prefilled alone (padding would cost compute), starting from the KV
    cache of the longest prefix it shares with a recent prompt: TextGrad's calls of one kind share
    a long system prompt. Each sequence stops at its own stop token or `max_tokens`. Calls at
    temperature > 0 run alone, seeded per call by the caller.

    Batching changes only floating-point rounding (padding is masked); the reply cache makes reruns
    repeat exactly what the first run got.
    """

    kind = "local"
    takes_grammar = True  # llguidance, token by token (`GrammarLogits`)

    def __init__(self, model_dir: Path | str, precision: str = "auto", *, name: str | None = None,
                 device: str | torch.device | None = None, max_batch: int = 8,
                 gather_seconds: float = 0.05, int8_decode: bool = True,
                 prefix_cache_tokens: int = 32768):
        """
        Args:
            model_dir: an HF directory with model and tokenizer (see `nslora.models.materialize`).
            precision: 'auto', 'bf16' or 'fp32'.
            name: the model's identity in the cache key (default: `model_dir`); give the stable
                name (e.g. 'embedded:smollm2') so the cache outlives the directory's location.
            device: default CUDA when available, else CPU.
            max_batch: most calls generated together.
            gather_seconds: after the first call of a batch arrives, how long to wait for others
                (threads that were answered together ask again within milliseconds).
            int8_decode: on a CPU, decode with int8 copies of the weights (`Int8DecodeLinear`)
                where torch has the kernel; prefill stays in `precision`.
            prefix_cache_tokens: most prompt tokens whose KV cache is kept for reuse by later
                prompts that start the same way (~28 KB per token for the 1.5B teacher in bf16);
                0 prefills every prompt in full, as one padded batch.
        """
        from transformers import AutoModelForCausalLM

        from ..models import compute_device, load_tokenizer, resolve_dtype, speed_up_generation, stop_token_ids

        self.model = name or str(model_dir)
        self.device = torch.device(device) if device else compute_device()
        self.dtype = resolve_dtype(precision, self.device)
        self.tokenizer = load_tokenizer(model_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        self.int8_decode = int8_decode and int8_decode_available(self.dtype, self.device)
        # Decoding reads the int8 copies; a packed bf16 copy as well would cost a teacher's size
        # in memory again for prefill alone.
        speed_up_generation(self.lm, self.dtype, pack_weights=not self.int8_decode)
        if self.int8_decode:
            use_int8_decode(self.lm, max_rows=max(16, max_batch))
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.max_batch = max(1, max_batch)
        self.gather_seconds = gather_seconds
        self.batch_sizes: list[int] = []  # size of every batch generated (for benchmarks)
        # Cached prompt prefixes need full-attention layers (a sliding window's cache is not a prefix).
        layer_types = getattr(self.lm.config.get_text_config(decoder=True), "layer_types", None) or []
        full_attention = all(kind == "full_attention" for kind in layer_types)
        self.prefix_tokens = max(0, prefix_cache_tokens) if full_attention else 0
        self._prefixes: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.prefill_tokens = {"cached": 0, "computed": 0}  # prompt tokens (for benchmarks)
        # transformers 5 renamed forward's `past_key_values` to `cache`.
        forward_arguments = inspect.signature(self.lm.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"
        self._generate_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._ll_tokenizer = None  # llguidance's view of the vocabulary, built at the first grammar

    def __repr__(self) -> str:
        return (f"LocalEngine({self.model!r}, dtype={self.dtype}, device={self.device}, "
                f"int8_decode={self.int8_decode})")

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text the model is conditioned on: its chat template, or plain 'role: content' lines
        for base models without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 seed: int = 0, grammar=None) -> Completion:
        """One reply, stopping at EOS / end-of-turn or after `max_tokens` new tokens; with a
        `grammar` (a `TaggedReply`), only tokens that keep the reply in its language are chosen.

        Returns:
            The reply (special tokens removed, whitespace kept as a server would) and exact token
            counts (new tokens include the stop token when the model emitted one).
        """
        ids = self.tokenizer(self.prompt(messages), add_special_tokens=False)["input_ids"]
        if temperature > 0:
            return self._sample(ids, max_tokens, temperature, seed, grammar)
        pending = _Pending(ids, max_tokens, grammar)
        with self._wake:
            if self._closed:
                raise TeacherCallError("closed", f"{self!r} was closed", retryable=False)
            self._queue.append(pending)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="nslora-local-teacher",
                                                daemon=True)
                self._worker.start()
            self._wake.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def forget_prefixes(self) -> None:
        """Drop the cached prompt prefixes (a benchmark's sides then start alike)."""
        with self._generate_lock:
            self._prefixes.clear()

    def close(self) -> None:
        """Stop the batching thread (calls already queued are answered first)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                deadline = time.monotonic() + self.gather_seconds
                while len(self._queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._wake.wait(left)
                # Similar lengths together: less padding (prefill itself, with the prefix cache
                # on, runs one prompt at a time).
                self._queue.sort(key=lambda p: len(p.ids))
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            try:
                results = self._generate_batch(batch)
            except BaseException as err:  # noqa: BLE001 - handed to the callers, who raise it
                for pending in batch:
                    pending.error = err
                    pending.done.set()
                continue
            for pending, result in zip(batch, results):
                pending.result = result
                pending.done.set()

    def _generate_batch(self, batch: list[_Pending]) -> list[Completion]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(len(p.ids) for p in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch])
        limits = torch.tensor([p.max_tokens for p in batch])

        class EachOwnLimit(StoppingCriteria):
            # Rows stop at their own max_tokens; generate runs until every row has stopped.
            def __call__(self, ids, scores, **kwargs):
                return (ids.shape[1] - width) >= limits.to(ids.device)

        options = {"max_new_tokens": int(limits.max()), "eos_token_id": self.stop_ids,
                   "pad_token_id": pad, "do_sample": False, "temperature": None, "top_p": None,
                   "top_k": None, "stopping_criteria": StoppingCriteriaList([EachOwnLimit()]),
                   **self._grammar_options([p.grammar for p in batch], width)}
        with self._generate_lock, torch.no_grad():
            self.batch_sizes.append(len(batch))
            if self.prefix_tokens and width > 1:
                # Prefill each prompt alone (no compute spent on padding), starting from the
                # longest cached prefix, then decode the batch from the left-padded caches.
                options[self._cache_argument] = self._padded_cache([self._prefill(p.ids[:-1]) for p in batch],
                                                                width - 1)
            output = self.lm.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=mask.to(self.device), **options)
        return [self._completion(len(p.ids), output[i, width:width + p.max_tokens].tolist())
                for i, p in enumerate(batch)]

    def _prefill(self, ids: list[int]):
        """The KV cache of `ids`, computed from the cached prefix that shares most tokens with it.

        TextGrad sends every call of a kind with the same long system prompt (and the same
        instructions around each sample), so after the first sample most of a prompt is cached.
        RoPE positions start at 0 for every prompt, so a shared prefix's keys are the same.
        """
        from transformers import DynamicCache

        key = tuple(ids)
        shared, source = 0, None
        for stored_ids, stored in self._prefixes.items():
            n = len(os.path.commonprefix([stored_ids, key]))  # works on any sequences
            if n > shared:
                shared, source = n, stored_ids
        if source is None:
            cache = DynamicCache(config=self.lm.config)
        else:
            self._prefixes.move_to_end(source)
            # Views of the stored tensors: extending the cache concatenates into new ones.
            cache = DynamicCache([(layer.keys[:, :, :shared], layer.values[:, :, :shared])
                                  for layer in self._prefixes[source].layers], config=self.lm.config)
        if shared < len(key):
            self.lm(input_ids=torch.tensor([key[shared:]], device=self.device), use_cache=True,
                    logits_to_keep=1, **{self._cache_argument: cache})
        self.prefill_tokens["cached"] += shared
        self.prefill_tokens["computed"] += len(key) - shared
        self._prefixes[key] = cache
        while sum(map(len, self._prefixes)) > self.prefix_tokens and len(self._prefixes) > 1:
            self._prefixes.popitem(last=False)
        return cache

    def _padded_cache(self, caches: list, length: int):
        """One batch cache from single-sequence caches, each left-padded to `length` positions
        (the padded positions are masked out by the attention mask)."""
        from transformers import DynamicCache

        layers = []
        for layer in range(len(caches[0].layers)):
            keys, values = [], []
            for cache in caches:
                k, v = cache.layers[layer].keys, cache.layers[layer].values
                keys.append(torch.nn.functional.pad(k, (0, 0, length - k.shape[2], 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, length - v.shape[2], 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(layers, config=self.lm.config)

    def _completion(self, prompt_tokens: int, new: list[int]) -> Completion:
        stop = next((i for i, token in enumerate(new) if token in self.stop_ids), None)
        if stop is not None:
            new = new[:stop + 1]  # the stop token counts, as a server counts it
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Completion(text, prompt_tokens, len(new))

    def _grammar_options(self, grammars: list, width: int) -> dict:
        """generate's `logits_processor` for the rows that have a grammar (none: no options)."""
        if all(g is None for g in grammars):
            return {}
        from transformers import LogitsProcessorList

        if self._ll_tokenizer is None:
            try:
                import llguidance.hf
            except ImportError as err:
                raise TeacherCallError("grammar", "teacher.grammar needs llguidance (pip install llguidance), "
                                       "or set teacher.grammar: false", retryable=False) from err
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.lm.config.vocab_size,
                                                              eos_token=self.stop_ids)
        return {"logits_processor": LogitsProcessorList([GrammarLogits(self._ll_tokenizer, grammars, width,
                                                                       self.stop_ids)])}

    def _sample(self, ids: list[int], max_tokens: int, temperature: float, seed: int,
                grammar=None) -> Completion:
        input_ids = torch.tensor([ids], device=self.device)
        cuda = [self.device] if self.device.type == "cuda" else []
        # fork_rng: seed this call without disturbing the caller's random state.
        with self._generate_lock, torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            output = self.lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tokenizer.pad_token_id, do_sample=True,
                                      temperature=temperature, **self._grammar_options([grammar], len(ids)))
        return self._completion(len(ids), output[0, len(ids):].tolist())
