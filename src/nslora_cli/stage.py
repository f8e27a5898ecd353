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


class StageError(click.ClickException):
    """A user error (bad params, bad data): one line on stderr, exit code 2, no traceback."""

    exit_code = 2


def _user_error_types() -> tuple[type[BaseException], ...]:
    from nslora.config import ParamsError
    from nslora.data import DataError
    from nslora.models import ModelSourceError
    from nslora.schemas import SchemaError

    return (ParamsError, DataError, SchemaError, ModelSourceError, FileNotFoundError, ValueError)


@contextmanager
def user_errors():
    """Turn errors caused by params, inputs or data into `StageError` (exit code 2, one line on
    stderr naming the file, row or parameter); programming errors keep their traceback."""
    try:
        yield
    except _user_error_types() as err:
        raise StageError(" ".join(str(err).split())) from err


def teacher_model_dir(params, base_dir: str) -> Path:
    """The HF directory of a local teacher: the base model itself when they are the same model,
    otherwise a copy materialised once in the user cache, in bf16: the teacher only generates,
    so float32 would double its 3.4 GB (Qwen2.5 1.5B) for nothing."""
    import torch

    from nslora.models import materialized

    if params.teacher.model == params.model.name:
        return Path(base_dir)
    return materialized(params.teacher.model, dtype=torch.bfloat16)
