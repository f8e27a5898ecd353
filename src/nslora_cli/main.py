"""The `nslora` command: check and explain params, set the number of epochs.

Run as: nslora --help
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click
import yaml

from nslora.config import SECTIONS, ParamsError, epochs_mapping
from nslora_cli.params_file import DEFAULT_PARAMS, load_params


@click.group()
def cli() -> None:
    """Neurosymbolic LoRA: a DVC pipeline (run it with `dvc repro`) and its helpers."""


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
    path = Path(params_path)
    text = path.read_text()
    mapping = epochs_mapping(n)
    if evaluate == "last":
        for k, entry in mapping.items():
            entry["evaluate"] = int(k) == n
    lines = [f"  '{k}': {{prev: {v['prev']}, evaluate: {str(v['evaluate']).lower()}}}" for k, v in mapping.items()]
    block = "epochs:\n" + "\n".join(lines) + "\n"
    start = text.find("\nepochs:")
    if start < 0:
        new_text = text.rstrip("\n") + "\n\n" + block
    else:
        end = start + 1 + len("epochs:")
        rest = text[end:].split("\n")
        # Skip the indented lines of the old section.
        skip = 1
        while skip < len(rest) and (rest[skip].startswith(" ") or not rest[skip].strip()):
            skip += 1
        tail = "\n".join(rest[skip:])
        new_text = text[:start + 1] + block + ("\n" + tail if tail.strip() else "")
    yaml.safe_load(new_text)
    path.write_text(new_text)
    load_params(path)
    click.echo(f"{path}: {n} epoch stage(s): " + ", ".join(f"lora_epoch@{k}" for k in mapping))


if __name__ == "__main__":
    cli()
