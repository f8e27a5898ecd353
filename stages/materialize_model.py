"""Materialise the base model once as a plain HF directory (weights + tokenizer): float32 for an
embedded model, the checkpoint's own dtype (bf16 for most hub models) otherwise.

Run as: python stages/materialize_model.py --params params.yaml --out models/base
"""

import click

from nslora.models import materialize
from nslora_cli.params_file import load_params
from nslora_cli.stage import setup_logging, user_errors


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--out", "out_dir", required=True, help="Directory to write the model to.")
def main(params_path: str, out_dir: str) -> None:
    setup_logging()
    with user_errors():
        model = load_params(params_path).model
        path = materialize(model.name, out_dir, revision=model.revision,
                           trust_remote_code=model.trust_remote_code)
    click.echo(f"materialised {model.name} at {path}")


if __name__ == "__main__":
    main()
