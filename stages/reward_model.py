"""Train the reward classifier on this run's criteria logs (README: "Baselines, the reward classifier
and the comparison").

Run as: python stages/reward_model.py --params params.yaml --selection-dir data/selection \
            --train-dir data/train --base models/base --out models/reward --metrics metrics/reward.json

Epoch k's criteria log is <selection-dir>/epoch_k.parquet (k = 1..last epoch) and the examples it
ranked are <train-dir>/epoch_{k-1}.parquet (the table epoch k trained on). The output directory is
a versioned artifact (head.safetensors + meta.json) that a later experiment selects with
`criteria: reward` and `reward.path`.
"""

import json
import time
from pathlib import Path

import click

from nslora.reward import TooFewPairs, fit_reward_model
from nslora.schemas import EXAMPLES, SELECTION, read_table
from nslora_cli.params_file import load_params
from nslora_cli.stage import StageError, setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--selection-dir", required=True, help="Holds epoch_<k>.parquet criteria logs.")
@click.option("--train-dir", required=True, help="Holds epoch_<k>.parquet examples tables.")
@click.option("--base", "base_dir", required=True, help="The materialised base model (encoder 'base').")
@click.option("--out", "out_dir", required=True, help="Reward model directory to write.")
@click.option("--metrics", "metrics_path", required=True)
def main(params_path, selection_dir, train_dir, base_dir, out_dir, metrics_path):
    setup_logging()
    start = time.monotonic()
    with user_errors():
        params = load_params(params_path)
        epochs = range(1, params.last_epoch + 1)
        selections = [read_table(Path(selection_dir) / f"epoch_{k}.parquet", SELECTION) for k in epochs]
        trains = [read_table(Path(train_dir) / f"epoch_{k - 1}.parquet", EXAMPLES) for k in epochs]
        try:
            model = fit_reward_model(selections, trains, base_dir, params.reward, precision=params.model.precision)
        except ImportError as err:  # reward.encoder=minilm without its package: say so in one line
            raise StageError(str(err)) from err
        except TooFewPairs as err:
            # A small or saturated run is not an error of the pipeline: record why there is no model
            # (a later criteria=reward run pointed here fails with this reason).
            model = None
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "NOT_TRAINED.txt").write_text(str(err) + "\n")
            click.echo(f"reward model not trained: {err}", err=True)
    if model is not None:
        model.save(out_dir)
    metrics = {"encoder": params.reward.encoder, "trained": model is not None,
               **({"head": model.meta["head"]["kind"], **model.metrics} if model else {}),
               "seconds": round(time.monotonic() - start, 1)}
    write_metrics(metrics_path, metrics)
    click.echo(json.dumps(metrics))


if __name__ == "__main__":
    main()
