"""One LoRA epoch (numerical update), continuing from the previous epoch's adapter directory.

Run as: python stages/lora_epoch.py --params params.yaml --epoch 1 --base models/base \
            --prev models/adapters/epoch_0 --train data/train/epoch_0.parquet \
            --out models/adapters/epoch_1 --stats data/stats/epoch_1.parquet --metrics metrics/train/epoch_1.json
Several processes: torchrun --nproc_per_node 4 stages/lora_epoch.py ...  (params: train.launcher)
"""

import json

import click

from nslora.config import launcher_processes
from nslora.methods import training_settings
from nslora.schemas import EXAMPLES, SAMPLE_STATS, read_table, write_table
from nslora.numerical.training import LoraTrainer
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--epoch", type=int, required=True, help="The epoch this run trains (1-based).")
@click.option("--base", "base_dir", required=True)
@click.option("--prev", "prev_dir", required=True, help="Adapter directory of the previous epoch.")
@click.option("--train", "train_path", required=True, help="Training examples for this epoch.")
@click.option("--out", "out_dir", required=True, help="Adapter directory to write.")
@click.option("--stats", "stats_path", required=True, help="Per-sample statistics Parquet to write.")
@click.option("--metrics", "metrics_path", required=True, help="Epoch summary JSON to write.")
def main(params_path, epoch, base_dir, prev_dir, train_path, out_dir, stats_path, metrics_path):
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        train_df = read_table(train_path, EXAMPLES)
        train = training_settings(params.method, params.train, params.lora.prefix_lr)
        trainer = LoraTrainer(base_dir, prev_dir, train, precision=params.model.precision,
                              attention=params.model.attention,
                              quantization=params.model.quantization)
        asked = launcher_processes(params.train.launcher)
        if asked and trainer.accelerator.num_processes != asked:
            raise ValueError(f"train.launcher {params.train.launcher!r} asks for {asked} processes, but this "
                             f"stage runs as {trainer.accelerator.num_processes}: run it through that "
                             "launcher (dvc repro does), or set train.launcher to what you run.")
        stats = trainer.run_epoch(train_df, epoch)
        summary = {
            "epoch": epoch,
            "loss": round(float(stats["loss"].mean()), 6),
            "grad_norm": round(float(stats["grad_norm"].mean()), 6),
            "tokens": int(trainer.tokens),
            "seconds": round(trainer.seconds, 1),
            "tokens_per_s": round(trainer.tokens / trainer.seconds, 1),
            "precision": trainer.precision,  # runs in other precisions are other results
        }
        trainer.save(out_dir, epoch=epoch, train_df=train_df, extra={"summary": summary})
        if trainer.accelerator.is_main_process:
            write_table(stats, stats_path, SAMPLE_STATS)
            write_metrics(metrics_path, summary)
            click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
