"""Collect the per-epoch evaluations into the accuracy curve (CSV + PNG) and metrics/eval.json.

Run as: python stages/summarize.py --params params.yaml --evals metrics/eval \
            --out metrics/eval.json --curve metrics/accuracy.csv --plot metrics/accuracy.png
"""

import json
from pathlib import Path

import click

from nslora.reporting import accuracy_curve, headline, plot_curve
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--evals", "evals_dir", required=True, help="Directory of epoch_<k>.json summaries.")
@click.option("--out", "out_path", required=True)
@click.option("--curve", "curve_path", required=True)
@click.option("--plot", "plot_path", required=True)
def main(params_path, evals_dir, out_path, curve_path, plot_path):
    setup_logging()
    with user_errors():
        # Only the epochs params.yaml declares: files of epochs removed since are stale.
        epochs = [0, *load_params(params_path).epochs]
        evals = [json.loads((Path(evals_dir) / f"epoch_{k}.json").read_text()) for k in epochs]
        curve = accuracy_curve(evals)
        if curve.empty:
            raise ValueError("summarize: no epoch was evaluated; set epochs.<k>.evaluate: true")
    Path(curve_path).parent.mkdir(parents=True, exist_ok=True)
    curve.to_csv(curve_path, index=False)
    plot_curve(curve, plot_path)
    summary = headline(curve)
    write_metrics(out_path, summary)
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
