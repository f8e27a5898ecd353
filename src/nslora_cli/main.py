"""The `nslora` command: check and explain params, set the number of epochs, estimate memory, downstream transfer.

Run as: nslora --help
        nslora downstream --train-size 128 --test-size 50 --epochs 1   # Gemma 3 270M, both datasets
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import click
import yaml

from nslora.config import SECTIONS, ParamsError, epochs_mapping, parse_params
from nslora_cli.experiments import compare, publish_reward, report
from nslora_cli.params_file import DEFAULT_PARAMS, load_params
from nslora_cli.stage import quiet_bitsandbytes


@click.group()
def cli() -> None:
    """Neurosymbolic LoRA: a DVC pipeline (run it with `dvc repro`) and its helpers."""
    quiet_bitsandbytes()


@cli.command()
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True)
@click.option("--describe", is_flag=True, help="Also list every key with its type and help text.")
def params(params_path: str, describe: bool) -> None:
    """Validate a params file (unknown or mistyped keys fail, naming the key)."""
    try:
        loaded = load_params(params_path)
    except ParamsError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{params_path}: valid ({len(loaded.epochs)} epochs, model {loaded.model.name}, "
               f"data {loaded.data.source}/{loaded.data.task})")
    if describe:
        for section, cls in SECTIONS.items():
            hints = typing.get_type_hints(cls)
            click.echo(f"\n{section}:")
            for f in dataclasses.fields(cls):
                value = getattr(getattr(loaded, section), f.name)
                kind = str(hints[f.name]).replace("typing.", "")
                click.echo(f"  {f.name} = {value!r}  [{kind}]\n      {f.metadata.get('help', '')}")


@cli.command()
@click.argument("n", type=int)
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True)
@click.option("--evaluate", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="Evaluate every epoch's adapter, or only the last one.")
def epochs(n: int, params_path: str, evaluate: str) -> None:
    """Set the number of epoch stages to N (rewrites the `epochs` section of params.yaml)."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(params_path)
    try:
        load_params(path)  # a broken file is reported as it is, not rewritten
        mapping = epochs_mapping(n)
    except ParamsError as err:
        raise click.ClickException(str(err)) from err
    # Round-trip YAML (the library DVC uses): comments, order and layout of the rest survive.
    document = YAML()
    document.preserve_quotes = True
    document.width = 4096  # never fold a long line (system prompts)
    document.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = document.load(path.read_text())
    section = CommentedMap()
    for k, v in mapping.items():
        entry = CommentedMap(prev=v["prev"], evaluate=v["evaluate"] if evaluate == "all" else int(k) == n)
        entry.fa.set_flow_style()
        section[k] = entry
    data["epochs"] = section
    out = io.StringIO()
    document.dump(data, out)
    try:
        written = parse_params(yaml.safe_load(out.getvalue()))
    except ParamsError as err:
        raise click.ClickException(f"{path}: {err} (file left unchanged)") from err
    path.write_text(out.getvalue())
    mapping = {str(k): v for k, v in written.epochs.items()}
    click.echo(f"{path}: {n} epoch stage(s): " + ", ".join(f"lora_epoch@{k}" for k in mapping))


@cli.command()
@click.argument("name")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True)
@click.option("--profiles", "profiles_dir", default="profiles", show_default=True)
def profile(name: str, params_path: str, profiles_dir: str) -> None:
    """Replace params.yaml with the named profile (profiles/NAME.yaml), e.g. gsm8k_paper."""
    source = Path(profiles_dir) / f"{name}.yaml"
    if not source.exists():
        known = sorted(p.stem for p in Path(profiles_dir).glob("*.yaml"))
        raise click.ClickException(f"{source}: no such profile; known: {', '.join(known) or 'none'}")
    try:
        load_params(source)
    except ParamsError as err:
        raise click.ClickException(str(err)) from err
    Path(params_path).write_text(source.read_text())
    click.echo(f"{params_path} <- {source} (git diff shows the change; dvc repro runs it)")


@cli.command()
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Where training will run (its precision and attention follow): default this machine.")
def plan(params_path: str, device: str | None) -> None:
    """Estimate the memory of one training process before a run (the model's shapes from its
    config.json, no weights loaded), e.g. `nslora plan --params profiles/gsm8k_paper.yaml --device cuda`."""
    import torch

    from nslora.config import launcher_processes
    from nslora.models import EMBEDDED, ModelSourceError, materialized
    from nslora.plan import training_memory

    try:
        loaded = load_params(params_path)
    except ParamsError as err:
        raise click.ClickException(str(err)) from err
    model = loaded.model
    target = torch.device(device) if device else None
    processes = launcher_processes(loaded.train.launcher) or max(1, torch.cuda.device_count())
    try:
        # An embedded model's config is in its GGUF: materialise it once, as `dvc repro` would.
        model_dir = materialized(model.name) if model.name.startswith("embedded:") else model.name
        estimate = training_memory(model_dir, model, loaded.lora, loaded.train, processes, target)
    except ModelSourceError as err:
        raise click.ClickException(str(err)) from err
    except (OSError, ValueError) as err:
        raise click.ClickException(
            f"model.name={model.name!r}: cannot read its config.json ({str(err).splitlines()[0][:200]}). "
            "Run where the hub is reachable or the model is in the HF cache, or point model.name at a "
            "local HF directory (" + ", ".join(f"embedded:{k}" for k in EMBEDDED) + " work offline).") from err
    click.echo(f"{params_path}: {model.name}, {processes} training process(es), {estimate.dtype}, "
               f"batch {loaded.train.batch_size} x {loaded.train.max_length} tokens")
    click.echo(estimate.table())


cli.add_command(compare)
cli.add_command(report)
cli.add_command(publish_reward)


@cli.command()
@click.option("--model", "model_name", default="embedded:gemma3-270m", show_default=True,
              help="Model to fine-tune: hub id, local HF directory or embedded:<key> "
                   "(materialised once under $NSLORA_CACHE/materialized/).")
@click.option("--original", "original_path", default="data/train/epoch_0.parquet", show_default=True,
              help="Original training set (EXAMPLES Parquet).")
@click.option("--remade", "remade_path", default="data/remade/train.parquet", show_default=True,
              help="Remade training set: the remade dataset (REMADE) or an EXAMPLES Parquet with "
                   "rewritten questions, e.g. data/train/epoch_2.parquet.")
@click.option("--test", "test_path", default="data/test.parquet", show_default=True,
              help="Test examples (EXAMPLES Parquet).")
@click.option("--epochs", type=int, default=None,
              help="LoRA epochs per arm [default: the number of epochs in params].")
@click.option("--train-size", type=int, default=None,
              help="Train on the first N examples of the original set (same ids in both arms).")
@click.option("--test-size", type=int, default=None,
              help="Evaluate on the first N test examples [default: params eval.limit].")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True,
              help="Params file: its lora, train, eval and model.precision/attention are used.")
@click.option("--work-dir", default=".nslora/downstream", show_default=True,
              help="Adapters and per-question predictions of both arms (replaced).")
@click.option("--out", "out_path", default="metrics/downstream.json", show_default=True)
def downstream(model_name: str, original_path: str, remade_path: str, test_path: str,
               epochs: int | None, train_size: int | None, test_size: int | None, params_path: str,
               work_dir: str, out_path: str) -> None:
    """Fine-tune another model on the original and on the remade dataset, evaluate both.

    Both arms use identical settings (LoRA init, batch plan, seeds, epochs, system prompt, test
    set); only the questions differ. Prints a two-row Markdown table and writes --out as JSON.
    """
    import pandas as pd

    from nslora.downstream import markdown_table, run_downstream
    from nslora.models import materialized
    from nslora.schemas import EXAMPLES, read_table
    from nslora_cli.stage import setup_logging, user_errors

    setup_logging()
    with user_errors():
        loaded = load_params(params_path)
        eval_cfg = loaded.eval if test_size is None else dataclasses.replace(loaded.eval, limit=test_size)
        read_table(test_path, EXAMPLES)  # fails early, naming the file and column
        for path in (original_path, remade_path):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path}: no such file")
        model_dir = materialized(model_name, loaded.model.revision, loaded.model.trust_remote_code)
        result = run_downstream(
            pd.read_parquet(original_path), pd.read_parquet(remade_path), Path(test_path), model_dir,
            Path(work_dir), loaded.lora, loaded.train, eval_cfg,
            epochs=epochs if epochs is not None else len(loaded.epochs),
            precision=loaded.model.precision, attention=loaded.model.attention, train_size=train_size)
    result = {"model_name": model_name, "original": original_path, "remade": remade_path, **result}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(markdown_table(result))


if __name__ == "__main__":
    cli()
