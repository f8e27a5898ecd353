"""Training throughput: one `lora_epoch` (per-sample statistics on) vs HF Trainer + peft.

Run as: python benchmarks/train_throughput.py [--samples 64] [--model-dir models/base] [--repeats 2] [--old]

Two Trainer baselines on the same model (SmolLM2-135M-Instruct unless --model-dir says otherwise),
the same GSM8K samples (../shared/data/gsm8k, or generated gsm_symbolic problems when that is
absent), the same LoRA (r=16 on attention + MLP), batch 8, max length 256, loss on answer tokens:
- `trainer_fair`: the Trainer as a competent CPU user sets it up: where bf16 is fast (AVX512-BF16,
  AMX or a GPU) base weights loaded in bf16 and `bf16=True` (autocast), elsewhere fp32 (emulated
  bf16 is slower); `train_sampling_strategy="group_by_length"` (little padding), eager attention
  (sdpa's CPU backward is slower in bf16), dynamic padding;
- `trainer` (with --old): the stock recipe, Trainer defaults (fp32, random batches).
Each side runs in its own process so peak RSS is its own, and times its epoch --repeats times
(default 2), keeping the fastest. Tokens are real (non-padding) tokens on every side.
The last line is one JSON object: {"ours": {...}, "trainer_fair": {...}, "speedup", "rss_ratio", ...}
(with --old also "trainer", "speedup_old", "rss_ratio_old").
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
SYSTEM_PROMPT = "You are a careful assistant. Solve the problem step by step and end with '#### ' and the answer."


def write_data(path: Path, samples: int) -> None:
    import pandas as pd

    from nslora.config import DataConfig
    from nslora.data import prepare_examples
    from nslora.schemas import EXAMPLES, write_table

    if GSM8K.exists():
        config = DataConfig(source="gsm8k", path=str(GSM8K.parent), train_size=samples, test_size=1,
                            system_prompt=SYSTEM_PROMPT)
    else:
        print(f"{GSM8K} is absent: using generated gsm_symbolic problems", file=sys.stderr)
        config = DataConfig(source="reasoning_gym", task="gsm_symbolic", train_size=samples, test_size=1,
                            system_prompt=SYSTEM_PROMPT)
    train, _ = prepare_examples(config)
    write_table(pd.DataFrame(train), path, EXAMPLES)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model_dir: str, data: str, work: str, repeats: int) -> dict:
    from nslora.config import LoraParams, TrainConfig
    from nslora.schemas import EXAMPLES, read_table
    from nslora.numerical.training import LoraTrainer, init_adapter

    train = TrainConfig(batch_size=8, max_length=256)
    df = read_table(data, EXAMPLES)
    init_adapter(model_dir, df, LoraParams(), train, Path(work) / "epoch_0")
    trainer = LoraTrainer(model_dir, Path(work) / "epoch_0", train, record_grad_norms=True)
    seconds = []
    for epoch in range(1, repeats + 1):
        stats = trainer.run_epoch(df, epoch=epoch, progress=False)
        assert stats["grad_norm"].notna().all()
        seconds.append(trainer.seconds)
    return {"tokens": trainer.tokens, "seconds": min(seconds), "precision": trainer.precision}


def run_trainer(model_dir: str, data: str, work: str, repeats: int, fair: bool = False) -> dict:
    """The Trainer + peft: stock defaults (fp32 on CPU, random batches, dynamic padding), or with
    `fair` its best CPU settings (bf16 weights and autocast, length grouping, eager attention)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from nslora.models import resolve_dtype

    from nslora.config import LoraParams
    from nslora.models import load_tokenizer
    from nslora.schemas import EXAMPLES, read_table
    from nslora.numerical.training import encode_all

    tokenizer = load_tokenizer(model_dir)
    df = read_table(data, EXAMPLES)
    encoded = encode_all(tokenizer, df, 256)
    rows = [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids),
             "labels": [-100] * s.prompt_tokens + s.input_ids[s.prompt_tokens:]} for s in encoded.values()]
    tokens = sum(len(r["input_ids"]) for r in rows)
    lora = LoraParams()
    # bf16 only where it is fast (AVX512-BF16/AMX or a GPU): elsewhere it is emulated and a competent
    # user keeps fp32, as `precision: auto` does for ours.
    bf16 = fair and resolve_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")) == torch.bfloat16
    load = {"dtype": torch.bfloat16 if bf16 else torch.float32, "attn_implementation": "eager"} if fair else {}
    # peft keeps the LoRA weights in float32 over the bf16 base (autocast_adapter_dtype), as ours does.
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, **load),
                           LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=work, per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=2e-4, report_to=[], save_strategy="no", logging_steps=1000,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
                             **({"bf16": bf16, "train_sampling_strategy": "group_by_length"} if fair else {}))
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train()
        seconds.append(time.perf_counter() - start)
    precision = "bf16 weights + bf16 autocast" if bf16 else str(model.dtype).replace("torch.", "")
    return {"tokens": tokens, "seconds": min(seconds), "precision": precision}


RUNS = {"ours": run_ours, "trainer": run_trainer,
        "trainer_fair": lambda *args: run_trainer(*args, fair=True)}


def child(kind: str, model_dir: str, data: str, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        result = RUNS[kind](model_dir, data, work, repeats)
    result["tokens_per_s"] = round(result["tokens"] / result["seconds"], 1)
    result["seconds"] = round(result["seconds"], 1)
    result["peak_rss_mb"] = round(peak_rss_mb())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--model-dir", default=None, help="Materialised HF model (default: embedded SmolLM2).")
    parser.add_argument("--old", action="store_true", help="Also run the stock fp32 Trainer (the old baseline).")
    parser.add_argument("--repeats", type=int, default=2,
                        help="Epochs each side times, keeping its fastest (this machine's timing noise is ~10%%).")
    parser.add_argument("--child", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model_dir, args.data, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from nslora.models import materialize

            model_dir = str(materialize("embedded:smollm2", Path(tmp) / "base"))
        data = str(Path(tmp) / "train.parquet")
        write_data(Path(data), args.samples)
        results = {}
        for kind in (["trainer"] if args.old else []) + ["trainer_fair", "ours"]:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--model-dir", model_dir,
                                  "--data", data, "--repeats", str(args.repeats)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{kind} run failed:\n{out.stderr[-3000:]}")
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{kind:12s} {results[kind]['tokens_per_s']:8.1f} tokens/s  "
                  f"peak RSS {results[kind]['peak_rss_mb']:6.0f} MB  ({results[kind]['precision']})", flush=True)
    for suffix, baseline in (("", "trainer_fair"), ("_old", "trainer")):
        if baseline in results:
            results["speedup" + suffix] = round(results["ours"]["tokens_per_s"] / results[baseline]["tokens_per_s"], 2)
            results["rss_ratio" + suffix] = round(results["ours"]["peak_rss_mb"] / results[baseline]["peak_rss_mb"], 2)
    results["model"] = args.model_dir or "embedded:smollm2"
    results["samples"] = args.samples
    results["repeats"] = args.repeats
    print(json.dumps(results))


if __name__ == "__main__":
    main()
