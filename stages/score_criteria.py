"""Score every training sample by the criterion, select the stalled ones, ask the student them.

Run as: python stages/score_criteria.py --params params.yaml --epoch 1 --base models/base \
            --adapter models/adapters/epoch_1 --train data/train/epoch_0.parquet \
            --stats data/stats/epoch_1.parquet --prev-stats data/stats/epoch_0.parquet \
            --out data/selection/epoch_1.parquet --metrics metrics/selection/epoch_1.json
"""

import json
from pathlib import Path

import click

from nslora.config import ParamsError
from nslora.selection.criteria import build_selection
from nslora.methods import symbolic_settings
from nslora.reward import RewardModel
from nslora.schemas import EXAMPLES, SAMPLE_STATS, SELECTION, read_table, write_table
from nslora.selection.student import Student
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--epoch", type=int, required=True)
@click.option("--base", "base_dir", required=True)
@click.option("--adapter", "adapter_dir", required=True, help="This epoch's adapter (the student).")
@click.option("--train", "train_path", required=True, help="The examples this epoch trained on.")
@click.option("--stats", "stats_path", required=True, help="This epoch's per-sample statistics.")
@click.option("--prev-stats", "prev_stats_path", required=True, help="The previous epoch's statistics.")
@click.option("--out", "out_path", required=True)
@click.option("--metrics", "metrics_path", required=True)
def main(params_path, epoch, base_dir, adapter_dir, train_path, stats_path, prev_stats_path, out_path, metrics_path):
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        train = read_table(train_path, EXAMPLES)
        stats = read_table(stats_path, SAMPLE_STATS)
        previous = read_table(prev_stats_path, SAMPLE_STATS)

        def student():
            return Student(base_dir, adapter_dir, params.model.precision, params.model.attention,
                           batch_size=params.eval.batch_size)

        reward = None
        if params.criteria == "reward":
            # The reward model is an earlier experiment's published artifact (its reward_model
            # stage); it scores this epoch's questions with the encoder it was trained on.
            if not params.reward.path or not Path(params.reward.path).is_dir():
                raise ParamsError(
                    f"reward.path: criteria=reward needs the directory of a published reward model "
                    f"(`nslora publish-reward models/reward <dir>` after a run); got {params.reward.path!r}")
            reward = RewardModel.load(params.reward.path).score(train, base_dir, precision=params.model.precision)
        cfg = symbolic_settings(params.method, params.symbolic)
        selection, metrics = build_selection(train, stats, previous, params.criteria, cfg,
                                             seed=params.train.seed, epoch=epoch, make_student=student,
                                             reward=reward)
    write_table(selection, out_path, SELECTION)
    write_metrics(metrics_path, metrics)
    click.echo(json.dumps(metrics))



if __name__ == "__main__":
    main()
