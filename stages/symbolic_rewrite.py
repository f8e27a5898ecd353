"""Symbolic update of one epoch: rewrite the selected questions the student got wrong.

Run as: python stages/symbolic_rewrite.py --params params.yaml --epoch 1 --base models/base \
            --adapter models/adapters/epoch_1 --train data/train/epoch_0.parquet \
            --selection data/selection/epoch_1.parquet --cache-dir .nslora/teacher_cache \
            --out data/train/epoch_1.parquet --log data/rewrites/epoch_1.parquet \
            --system-prompt-out data/system_prompt/epoch_1.txt --metrics metrics/symbolic/epoch_1.json

Teacher replies are cached in --cache-dir as they arrive, so a re-run (forced, or after a kill)
repeats no completed call; the API key is read from the environment (teacher.api_key_env).
"""

import json
from pathlib import Path

import click

from nslora.models import local_teacher_dir
from nslora.schemas import EXAMPLES, REWRITES, SELECTION, read_table, write_table
from nslora.selection.student import Student
from nslora.methods import check_teacher, engine_name, symbolic_settings
from nslora.symbolic import make_rewriter, rewrite_epoch
from nslora.teacher import make_teacher
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors, write_metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--epoch", type=int, required=True)
@click.option("--base", "base_dir", required=True)
@click.option("--adapter", "adapter_dir", required=True, help="This epoch's adapter (the student).")
@click.option("--train", "train_path", required=True, help="The examples this epoch trained on.")
@click.option("--selection", "selection_path", required=True)
@click.option("--cache-dir", required=True, type=click.Path(path_type=Path), help="Teacher reply cache.")
@click.option("--out", "out_path", required=True, help="The next epoch's examples.")
@click.option("--log", "log_path", required=True, help="One row per rewritten sample.")
@click.option("--system-prompt-out", required=True, help="The system prompt after this epoch.")
@click.option("--metrics", "metrics_path", required=True)
def main(params_path, epoch, base_dir, adapter_dir, train_path, selection_path, cache_dir, out_path,
         log_path, system_prompt_out, metrics_path):
    setup_logging()
    teacher = None
    with user_errors():
        params = load_params(params_path)
        cfg, engine = symbolic_settings(params.method, params.symbolic), params.teacher.engine
        check_teacher(params.method, engine, cfg)
        train = read_table(train_path, EXAMPLES)
        selection = read_table(selection_path, SELECTION)
        work = selection[selection["selected"] & ~selection["correct"]]
        student = rewriter = None
        if len(work) or cfg.update_system_prompt and selection["selected"].any():
            student = Student(base_dir, adapter_dir, params.model.precision, params.model.attention,
                              batch_size=params.eval.batch_size)
            if engine != "hint":
                local_dir = (local_teacher_dir(params.teacher.model, params.model.name, base_dir)
                             if engine == "local" else None)
                teacher = make_teacher(params.teacher, cache_dir, local_model_dir=local_dir,
                                       precision=params.model.precision)
            rewriter = make_rewriter(params.method, teacher, student, cfg)
        name = engine_name(engine, params.teacher.model)
        result = rewrite_epoch(train, selection, rewriter, student, epoch, cfg,
                               concurrency=params.teacher.concurrency, engine_name=name, budget=teacher)
    metrics = {**result.metrics, "engine": name, "teacher": teacher.stats() if teacher else {"calls": 0},
               "teacher_calls": teacher.call_log() if teacher else []}
    if teacher is not None:
        teacher.close()
    write_table(result.train, out_path, EXAMPLES)
    write_table(result.log, log_path, REWRITES)
    Path(system_prompt_out).parent.mkdir(parents=True, exist_ok=True)
    Path(system_prompt_out).write_text(result.system_prompt + "\n")
    write_metrics(metrics_path, metrics)
    click.echo(json.dumps({k: metrics[k] for k in ("epoch", "selected", "incorrect", "accepted", "engine")}))


if __name__ == "__main__":
    main()
