"""Load params.yaml (the one place that reads it) into `nslora.config.Params`."""

from __future__ import annotations

from pathlib import Path

import yaml

from nslora.config import Params, ParamsError, parse_params

DEFAULT_PARAMS = "params.yaml"


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file.

    Raises:
        ParamsError: the file is missing, is not YAML, or a key is unknown or mistyped; the message
            starts with the file name.
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the repository root)")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    try:
        return parse_params(mapping or {})
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
