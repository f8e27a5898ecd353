"""Shared plumbing of the stage scripts: logging, and user errors as one line instead of a traceback."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import click


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("NSLORA_LOG", "INFO"),
                        format="%(levelname)s %(name)s: %(message)s")
    # Third-party chatter that says nothing about this run.
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "lm_eval.api.task"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_bitsandbytes()


def quiet_bitsandbytes() -> None:
    """bitsandbytes, imported by peft wherever it is installed, warns on every import that it could
    not fetch an optional CPU kernel from the hub (offline, or publisher not trusted); its own
    kernel is used instead, so the warning says nothing about the run."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class StageError(click.ClickException):
    """A user error (bad params, bad data): one line on stderr, exit code 2, no traceback."""

    exit_code = 2


@contextmanager
def user_errors():
    """Turn errors caused by params, inputs or data into `StageError` (exit code 2, one line on
    stderr naming the file, row or parameter); programming errors keep their traceback."""
    try:
        yield
    # The project's input errors (ParamsError, DataError, SchemaError, ModelSourceError, ...) are
    # ValueErrors; naming them here would make every stage import (and depend on) their modules.
    except (FileNotFoundError, ValueError) as err:
        raise StageError(" ".join(str(err).split())) from err


def write_metrics(path, metrics: dict) -> None:
    """A stage's metrics JSON (indented, as `dvc metrics show` and people read it), written whole
    or not at all: a killed stage never leaves a truncated file for DVC to pick up."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)
