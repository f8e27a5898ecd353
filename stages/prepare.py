"""Write the train and test example tables (DVC stage `prepare`).

Run as: python stages/prepare.py --params params.yaml --train-out data/train/epoch_0.parquet \
            --test-out data/test.parquet

Reads the `data` section of the params file; see `nslora.data.prepare_examples` for the sources.
"""

import click

from nslora.data import prepare_examples
from nslora.schemas import EXAMPLES, write_table
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--train-out", required=True, help="Train examples Parquet to write.")
@click.option("--test-out", required=True, help="Test examples Parquet to write.")
def main(params_path: str, train_out: str, test_out: str) -> None:
    setup_logging()
    with user_errors():
        train, test = prepare_examples(load_params(params_path).data)
    write_table(train, train_out, EXAMPLES)
    write_table(test, test_out, EXAMPLES)
    click.echo(f"prepare: {len(train)} train -> {train_out}, {len(test)} test -> {test_out}")


if __name__ == "__main__":
    main()
