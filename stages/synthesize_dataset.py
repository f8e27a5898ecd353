"""Publish the remade dataset: the last epoch's training set with its dataset card.

Run as: python stages/synthesize_dataset.py --params params.yaml --train-dir data/train \
            --rewrites-dir data/rewrites --out data/remade/train.parquet \
            --card data/remade/README.md --metrics metrics/remade.json

Reads data/train/epoch_<N>.parquet (N = the last epoch params.yaml declares) and the rewrite logs of
epochs 1..N; files of epochs removed from params since are stale and ignored. `dvc push` publishes
the Parquet file; `dvc get <repo> data/remade/train.parquet` fetches it.
"""

import json
from pathlib import Path

import click

from nslora.methods import engine_name
from nslora.remade import SOURCE_LICENSES, rewrite_counts, synthesize
from nslora.schemas import EXAMPLES, REMADE, REWRITES, read_table, write_table
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--train-dir", required=True, type=click.Path(path_type=Path),
              help="Directory of epoch_<k>.parquet training tables.")
@click.option("--rewrites-dir", required=True, type=click.Path(path_type=Path),
              help="Directory of epoch_<k>.parquet rewrite logs.")
@click.option("--out", "out_path", required=True, help="The remade dataset (Parquet, schema REMADE).")
@click.option("--card", "card_path", required=True, help="The dataset card (Markdown).")
@click.option("--metrics", "metrics_path", required=True)
def main(params_path, train_dir, rewrites_dir, out_path, card_path, metrics_path):
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        last = params.last_epoch
        final_train = read_table(train_dir / f"epoch_{last}.parquet", EXAMPLES)
        logs = [read_table(rewrites_dir / f"epoch_{k}.parquet", REWRITES) for k in range(1, last + 1)]
        teacher = engine_name(params.teacher.engine, params.teacher.model)  # as in rewrite_engine
        table, card = synthesize(final_train, logs, criterion=params.criteria, teacher=teacher,
                                 method=params.method,
                                 source_license=SOURCE_LICENSES[params.data.source])
    write_table(table, out_path, REMADE)
    Path(card_path).parent.mkdir(parents=True, exist_ok=True)
    Path(card_path).write_text(card)
    counts = rewrite_counts(logs)
    rewritten = int(table["rewritten"].sum())
    metrics = {"rows": len(table), "rewritten": rewritten,
               "fraction": round(rewritten / len(table), 6) if len(table) else 0.0,
               "attempted": counts["attempted"], "rejected": counts["rejected"]}
    write_metrics(metrics_path, metrics)
    click.echo(json.dumps(metrics))


if __name__ == "__main__":
    main()
