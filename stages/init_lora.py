"""Epoch 0: a fresh LoRA adapter with its batch plan (composed once, replayed every epoch).

Run as: python stages/init_lora.py --params params.yaml --base models/base \
            --train data/train/epoch_0.parquet --out models/adapters/epoch_0
"""

import click

from nslora.schemas import EXAMPLES, read_table
from nslora.training import init_adapter
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--base", "base_dir", required=True, help="Materialised base model directory.")
@click.option("--train", "train_path", required=True, help="Training examples (Parquet, EXAMPLES schema).")
@click.option("--out", "out_dir", required=True, help="Adapter directory to write (epoch 0).")
def main(params_path: str, base_dir: str, train_path: str, out_dir: str) -> None:
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        path = init_adapter(base_dir, read_table(train_path, EXAMPLES), params.lora, params.train, out_dir)
    click.echo(f"initialised LoRA adapter at {path}")


if __name__ == "__main__":
    main()
