"""`nslora compare` queues the paper's comparison as DVC experiments; `nslora report` turns
`dvc exp show --json` into a Markdown table, the CSV it was made from, and accuracy-per-epoch plots.

    nslora compare --seeds 0,1,2 --run          # methods x criteria x engines x seeds, then runs them
    nslora report --out results
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import click

from nslora.config import CRITERIA
from nslora.methods import METHODS
from nslora.report import (GRID_METHODS, PAIRED_METHODS, differences_from_lora, experiment_grid, markdown_table,
                           merge_earlier, plot_epochs, read_report_runs, runs_from_exp_show, summarize_runs,
                           write_report_runs)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _dvc(*args: str) -> str:
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"dvc {' '.join(args)} failed:\n{result.stderr.strip()[-2000:]}")
    return result.stdout


@click.command()
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help=f"Any of {', '.join(GRID_METHODS)} (nslora_sysprompt: NS-LoRA that also refines the system prompt).")
@click.option("--criteria", default="loss_ratio,grad_norm,random", show_default=True,
              help="Criteria for NS-LoRA runs (other methods run with the first).")
@click.option("--engines", default="local,hint", show_default=True,
              help="Teacher engines for runs with symbolic updates.")
@click.option("--seeds", default="0,1,2", show_default=True, help="train.seed values; the same for every row.")
@click.option("--set", "extra", multiple=True, help="Extra -S overrides for every run, e.g. data.train_size=128.")
@click.option("--run/--queue-only", default=False, help="Run the queue now (dvc exp run --run-all).")
@click.option("--dry-run", is_flag=True, help="Print the dvc commands instead of queueing.")
def compare(methods, criteria, engines, seeds, extra, run, dry_run):
    """Queue the comparison of methods x criteria x engines x seeds with `dvc exp run --queue`."""
    unknown = [m for m in _csv(methods) if m not in GRID_METHODS] + [c for c in _csv(criteria) if c not in CRITERIA]
    if unknown:
        raise click.ClickException(f"unknown method or criterion: {unknown}")
    if "reward" in _csv(criteria) and not any(o.startswith("reward.path=") for o in extra):
        raise click.ClickException("criteria reward ranks by a published reward model: add "
                                   "--set reward.path=<dir> (see nslora publish-reward)")
    grid = experiment_grid(_csv(methods), _csv(criteria), _csv(engines), [int(s) for s in _csv(seeds)])
    for item in grid:
        args = ["exp", "run", "--queue", "-n", item["name"]]
        for key, value in item["set"].items():
            args += ["-S", f"{key}={value}"]
        for override in extra:
            args += ["-S", override]
        if dry_run:
            click.echo("dvc " + " ".join(args))
        else:
            _dvc(*args)
    click.echo(f"{len(grid)} experiment(s) {'listed' if dry_run else 'queued'}")
    if run and not dry_run:
        # Sequential on purpose: one run already uses every core of a laptop.
        subprocess.run(["dvc", "exp", "run", "--run-all"], check=True)


def _final_correctness(runs) -> dict:
    """Each symbolic/LoRA run's final-epoch per-question correctness, read from the experiment's
    commit through DVC (the predictions Parquet is a cached stage output, not in git)."""
    import io

    import dvc.api
    import pandas as pd

    from nslora.schemas import PREDICTIONS, read_table

    correct = {}
    wanted = runs[runs["method"].isin(PAIRED_METHODS)]
    for row in wanted.itertuples():
        path = f"data/eval/epoch_{int(row.final_epoch)}.parquet"
        try:
            raw = dvc.api.read(path, repo=".", rev=row.rev, mode="rb")
        except Exception as err:  # noqa: BLE001 - any DVC failure means the same thing here
            raise click.ClickException(f"{row.experiment}: cannot read {path} at {row.rev[:7]} ({err}); "
                                       "is the DVC cache of that experiment present (dvc exp pull)?") from err
        frame = read_table(io.BytesIO(raw), PREDICTIONS, f"{row.experiment}:{path}")
        correct[row.rev] = pd.Series(frame["correct_flexible"].to_numpy(), index=frame["id"])
    return correct


@click.command()
@click.option("--out", "out_dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--exp-show-json", type=click.Path(exists=True, path_type=Path),
              help="Read a saved `dvc exp show --json` instead of running it.")
@click.option("--command", "commands", multiple=True,
              help="A command line that produced the runs, written at the top of the report (repeatable).")
@click.option("--resamples", default=10_000, show_default=True, help="Bootstrap resamples for the intervals.")
@click.option("--earlier", "earlier_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Also include the runs of an earlier report directory (its runs.csv and correctness.csv), "
                   "e.g. runs made in another workspace; a run name present here keeps this one (repeatable).")
@click.option("--all-commits", is_flag=True,
              help="Include experiments based on earlier commits (dvc exp show -A), e.g. after committing code.")
def report(out_dir: Path, exp_show_json: Path | None, commands: tuple[str, ...], resamples: int,
           earlier_dirs: tuple[Path, ...], all_commits: bool):
    """Write results/report.md (table), results/runs.csv (what the table is made from),
    results/correctness.csv (each run's per-question results, for --earlier), results/differences.csv
    (NS-LoRA − LoRA, paired bootstrap) and results/accuracy_per_epoch.png."""
    raw = exp_show_json.read_text() if exp_show_json else _dvc("exp", "show", "--json", *(["-A"] if all_commits else []))
    try:
        runs = runs_from_exp_show(json.loads(raw))
        correct = _final_correctness(runs)
        for directory in earlier_dirs:  # read before writing: --earlier may be --out itself
            runs, correct = merge_earlier(runs, correct, *read_report_runs(directory))
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    write_report_runs(runs, correct, out_dir)
    table = summarize_runs(runs)
    deltas = differences_from_lora(runs, correct, resamples)
    deltas.to_csv(out_dir / "differences.csv", index=False, float_format="%.6g")
    plot = plot_epochs(runs, out_dir / "accuracy_per_epoch.png")
    header = "".join(f"    {c}\n" for c in commands)
    precisions = sorted(set(runs["precision"].dropna()))
    trained = f", trained in {' and '.join(precisions)}" if precisions else ""
    text = ("# Comparison\n\n" + (f"Made with:\n\n{header}\n" if header else "") +
            "Test accuracy after the last epoch, mean ± standard deviation over seeds "
            f"(from `dvc exp show`{' and earlier reports' if earlier_dirs else ''}, {len(runs)} runs{trained}). "
            "\"− LoRA\" is the accuracy difference to LoRA with the same seeds on the same questions, "
            f"with a 95% paired bootstrap interval (seeds and questions resampled, {resamples} resamples).\n\n" +
            markdown_table(table, deltas) + f"\n![accuracy per epoch]({plot.name})\n")
    (out_dir / "report.md").write_text(text)
    click.echo(text)


@click.command("publish-reward")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
def publish_reward(source: Path, target: Path):
    """Copy a run's reward model (models/reward) to TARGET and track it with DVC, so later
    experiments use it with `-S criteria=reward -S reward.path=TARGET` (no cycle in the DAG)."""
    import shutil

    if not (source / "meta.json").exists():
        reason = (source / "NOT_TRAINED.txt")
        raise click.ClickException(f"{source}: no trained reward model"
                                   + (f" ({reason.read_text().strip()})" if reason.exists() else ""))
    if target.exists():
        raise click.ClickException(f"{target}: exists; reward models are versioned, pick a new name")
    shutil.copytree(source, target)
    _dvc("add", str(target))
    click.echo(f"published {source} as {target}; commit it:\n"
               f"  git add {target}.dvc {target.parent / '.gitignore'} && git commit -m 'reward model {target.name}'\n"
               f"then: dvc exp run -S criteria=reward -S reward.path={target}")
