"""Load params.yaml (the one place that reads it) into `nslora.config.Params`."""

from __future__ import annotations

from pathlib import Path

import yaml

from nslora.config import Params, ParamsError, parse_params

DEFAULT_PARAMS = "params.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: PyYAML would keep the
    last silently, DVC refuses the file."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key]})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file.

    Raises:
        ParamsError: the file is missing, is not YAML, repeats a key, or a key is unknown, mistyped
            or out of range; the message starts with the file name.
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the repository root)")
    try:
        mapping = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    try:
        return parse_params(mapping or {})
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
