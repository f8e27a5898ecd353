"""Epoch 0: a fresh LoRA (or, for method=prefix, prefix-tuning) adapter with its batch plan (composed once, replayed every epoch), and
the initial model's per-sample losses (the reference of the loss-change-ratio criterion at epoch 1).

Run as: python stages/init_lora.py --params params.yaml --base models/base \
            --train data/train/epoch_0.parquet --out models/adapters/epoch_0 --stats data/stats/epoch_0.parquet
"""

import click

from nslora.methods import adapter_type
from nslora.schemas import EXAMPLES, SAMPLE_STATS, read_table, write_table
from nslora.numerical.training import LoraTrainer, init_adapter
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--base", "base_dir", required=True, help="Materialised base model directory.")
@click.option("--train", "train_path", required=True, help="Training examples (Parquet, EXAMPLES schema).")
@click.option("--out", "out_dir", required=True, help="Adapter directory to write (epoch 0).")
@click.option("--stats", "stats_path", required=True, help="Per-sample losses of the initial model.")
def main(params_path: str, base_dir: str, train_path: str, out_dir: str, stats_path: str) -> None:
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        train = read_table(train_path, EXAMPLES)
        path = init_adapter(base_dir, train, params.lora, params.train, out_dir, adapter_type(params.method))
        trainer = LoraTrainer(base_dir, path, params.train, precision=params.model.precision,
                              attention=params.model.attention,
                              quantization=params.model.quantization, record_grad_norms=False)
        write_table(trainer.measure_losses(train, epoch=0), stats_path, SAMPLE_STATS)
    click.echo(f"initialised LoRA adapter at {path}; initial losses in {stats_path}")


if __name__ == "__main__":
    main()
