"""The system prompt epoch 1 starts with. For method=two_stage, TextGrad optimises it over a sample
of the training set first (the paper's two-stage baseline); every other method passes it through.

Run as: python stages/initial_prompt.py --params params.yaml --base models/base \
            --train data/prepared/train.parquet --cache-dir .nslora/teacher_cache \
            --out data/train/epoch_0.parquet --metrics metrics/initial_prompt.json
"""

import json
import math
import time
from pathlib import Path

import click

from nslora.methods import METHODS, check_teacher
from nslora.models import local_teacher_dir
from nslora.schemas import EXAMPLES, read_table, write_table
from nslora.selection.student import Student
from nslora.symbolic import TextGradRewriter, optimize_initial_prompt
from nslora.teacher import make_teacher
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--base", "base_dir", required=True)
@click.option("--train", "train_path", required=True, help="The prepared training examples.")
@click.option("--cache-dir", required=True, type=click.Path(path_type=Path), help="Teacher reply cache.")
@click.option("--out", "out_path", required=True, help="The examples epoch 1 trains on.")
@click.option("--metrics", "metrics_path", required=True)
def main(params_path, base_dir, train_path, cache_dir, out_path, metrics_path):
    setup_logging()
    with user_errors():
        params = load_params(params_path)
        train = read_table(train_path, EXAMPLES)
        metrics = {"method": params.method, "changed": False}
        start = time.perf_counter()
        if METHODS[params.method].prompt_before_training:
            check_teacher(params.method, params.teacher.engine, params.symbolic)
            student = Student(base_dir, None, params.model.precision, params.model.attention,
                              batch_size=params.eval.batch_size)
            local_dir = (local_teacher_dir(params.teacher.model, params.model.name, base_dir)
                         if params.teacher.engine == "local" else None)
            teacher = make_teacher(params.teacher, cache_dir, local_model_dir=local_dir,
                                   precision=params.model.precision)
            samples = math.ceil(params.symbolic.ratio * len(train))
            train, found = optimize_initial_prompt(train, TextGradRewriter(teacher, student, params.symbolic),
                                                   student, params.symbolic, samples, params.train.seed,
                                                   params.teacher.concurrency)
            metrics.update(found, teacher=teacher.stats())
            teacher.close()
        metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_table(train, out_path, EXAMPLES)
    write_metrics(metrics_path, metrics)
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "teacher"}))


if __name__ == "__main__":
    main()
