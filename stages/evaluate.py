"""Evaluate the base model, or the base model + one epoch's adapter, with lm-evaluation-harness.

Run as: python stages/evaluate.py --params params.yaml --epoch 2 --base models/base \
            --adapter models/adapters/epoch_2 --test data/test.parquet \
            --metrics metrics/eval/epoch_2.json --predictions data/eval/epoch_2.parquet
Without --adapter it evaluates the pre-trained model (epoch 0) with the test data's system prompt;
with one, it uses the system prompt recorded in the adapter's meta.json (the one it trained with).
"""

import json

import click
import pandas as pd

from nslora.evaluation.harness import evaluate
from nslora.schemas import EXAMPLES, PREDICTIONS, read_table, write_table
from nslora.numerical.training import read_meta
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--epoch", type=int, required=True, help="Epoch of the adapter (0 = pre-trained).")
@click.option("--base", "base_dir", required=True)
@click.option("--adapter", "adapter_dir", default=None, help="Adapter directory (omit for the base model).")
@click.option("--test", "test_path", required=True, help="Test examples Parquet.")
@click.option("--metrics", "metrics_path", required=True, help="Summary JSON to write.")
@click.option("--predictions", "predictions_path", required=True, help="Per-question Parquet to write.")
@click.option("--enabled", type=bool, default=True, show_default=True,
              help="false: record that this epoch is not evaluated (params epochs.<k>.evaluate).")
def main(params_path, epoch, base_dir, adapter_dir, test_path, metrics_path, predictions_path, enabled):
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        test = read_table(test_path, EXAMPLES)
        if enabled:
            system_prompt = read_meta(adapter_dir)["system_prompt"] if adapter_dir else str(test.system_prompt.iloc[0])
            result = evaluate(base_dir, adapter_dir, test_path, system_prompt, params.eval,
                              precision=params.model.precision, attention=params.model.attention, epoch=epoch)
            if result is None:
                return  # another process of a multi-process launch: the first one writes
            summary, predictions = result
        else:
            summary, predictions = {"epoch": epoch, "evaluated": False}, pd.DataFrame(columns=PREDICTIONS.names)
    write_table(predictions, predictions_path, PREDICTIONS)
    write_metrics(metrics_path, summary)
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
