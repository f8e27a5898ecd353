"""`nslora plan`'s memory estimate against what training really takes, on this machine.

Run as: python benchmarks/memory_plan.py [--params params.yaml] [--steps 3] [--gradient-checkpointing]

Trains `--steps` batches of full-length samples (every sample reaches train.max_length, the case
the estimate is sized for) with the params' model, LoRA and batch settings, and compares the growth
of peak resident memory during the steps (from before the trainer is built) with the estimate's
total. On a CPU, resident memory is the only measure (the allocator keeps freed activation pages,
as training does). The last line is one JSON object: {"estimate_gib", "measured_gib", "ratio", ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resident() -> tuple[int, int]:
    """(peak, current) resident bytes of this process."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", status).group(1)) * 1024 for key in ("VmHWM", "VmRSS"))


def full_length_examples(n: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_examples

    examples = make_examples(n)
    # Long solutions: every sample is cut at max_length, so each micro-batch is as large as planned.
    examples["solution"] = examples["solution"] + " Checking the sum once more." * 80
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    from nslora.models import materialized
    from nslora.numerical.training import LoraTrainer, init_adapter
    from nslora.plan import GIB, training_memory
    from nslora_cli.params_file import load_params

    params = load_params(args.params)
    train = dataclasses.replace(params.train, gradient_checkpointing=args.gradient_checkpointing)
    name = params.model.name
    base = materialized(name) if name.startswith("embedded:") else Path(name)
    estimate = training_memory(base, params.model, params.lora, train)
    examples = full_length_examples(train.batch_size * args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        epoch0 = init_adapter(base, examples, params.lora, train, Path(tmp) / "epoch_0")
        gc.collect()
        before = resident()[1]
        trainer = LoraTrainer(base, epoch0, train, precision=params.model.precision,
                              attention=params.model.attention, quantization=params.model.quantization)
        # Loading maps the checkpoint file (float32 for an embedded model), whose pages count as
        # resident while mapped; that peak is the loader's, not training's: reset the peak after it.
        Path("/proc/self/clear_refs").write_text("5")
        trainer.run_epoch(examples, 1, progress=False)
        measured = resident()[0] - before
    print(estimate.table())
    print(f"measured peak resident growth: {measured / GIB:.2f} GiB over {args.steps} steps")
    print(json.dumps({"model": name, "dtype": estimate.dtype, "gradient_checkpointing": train.gradient_checkpointing,
                      "tokens_per_micro_batch": estimate.tokens_per_micro_batch,
                      "estimate_gib": round(estimate.total / GIB, 3), "measured_gib": round(measured / GIB, 3),
                      "ratio": round(measured / estimate.total, 3)}))


if __name__ == "__main__":
    main()
