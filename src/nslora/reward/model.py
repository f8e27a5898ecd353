"""The reward head, its Bradley-Terry training, and the saved artifact (`RewardModel`)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import RewardConfig, to_dict
from ..encoders import Encoder, make_encoder

from .pairs import TooFewPairs, embed_pair_texts, pairs_hash, preference_pairs, sample_text, split_pairs

log = logging.getLogger(__name__)

FORMAT = "nslora.reward_model"
FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"
BATCH_SIZE = 64          # pairs per optimizer step of the head
WEIGHT_DECAY = 0.01      # AdamW's default; the head is linear, so this is mild L2 shrinkage
# A fixed text embedded at training and at scoring time: if the encoder now available computes a
# different vector, the head would be applied to features it never saw (another base model, or
# different weights under the same name). bf16 vs fp32 keeps the cosine above ~0.99.
PROBE_TEXT = "Q: A farmer has 3 cows and 2 hens. How many legs are there?\nA: 3 * 4 + 2 * 2 = 16.\n#### 16"
PROBE_MIN_COSINE = 0.98


# --------------------------------------------------------------------------------------------------
# Head and training


class RewardHead(torch.nn.Module):
    """r(x) = w . (x - mean) / std + b: standardising with the training embeddings' statistics keeps
    one learning rate right for encoders whose feature scales differ by orders of magnitude (LLM
    hidden states have a few huge dimensions; MiniLM's are unit-norm)."""

    def __init__(self, dim: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden:
            self.layers = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
        else:
            self.layers = torch.nn.Sequential(torch.nn.Linear(dim, 1))
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std).squeeze(-1)


def _accuracy(margins: torch.Tensor) -> float:
    """Share of pairs ranked right (r(plus) > r(minus)); exact ties count half."""
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean()) if len(margins) else float("nan")


def train_reward_model(pairs: pd.DataFrame, embeddings: Mapping[str, np.ndarray], cfg: RewardConfig,
                       encoder: Encoder | None = None, hidden: int = 0) -> "RewardModel":
    """Fit the reward head with the Bradley-Terry loss -log sigma(r(plus) - r(minus)) (AdamW, seeded).

    Samples, not pairs, are split: ids hashed below `cfg.holdout_fraction` are held out, pairs with
    both sides held out measure accuracy, pairs mixing the two sides are dropped, so no held-out
    pair contains a sample (in any epoch) the head was trained on.

    Args:
        pairs: from `preference_pairs`.
        embeddings: {text: vector} covering every text of `pairs` (`embed_pair_texts`).
        cfg: the `reward` params (epochs, lr, holdout_fraction, seed).
        encoder: the encoder that made `embeddings`; its description and its embedding of a probe
            text are stored with the model so `score` can check it is given the same encoder.
        hidden: 0 = linear head; > 0 = an MLP with this many hidden units.

    Returns:
        The trained `RewardModel`; `model.metrics` holds pair counts and train / held-out pair
        accuracy with the binomial standard error of the latter (pairs share samples, so the real
        uncertainty is larger).

    Raises:
        ValueError: no training pairs left after the split, or a text without an embedding.
    """
    texts = list(dict.fromkeys(pairs["text_plus"].tolist() + pairs["text_minus"].tolist()))
    missing = [t for t in texts if t not in embeddings]
    if missing:
        raise ValueError(f"{len(missing)} pair text(s) have no embedding, e.g. {missing[0][:80]!r}")
    row = {t: k for k, t in enumerate(texts)}
    x = torch.from_numpy(np.stack([np.asarray(embeddings[t], dtype=np.float32) for t in texts]))
    plus = torch.tensor([row[t] for t in pairs["text_plus"]], dtype=torch.long)
    minus = torch.tensor([row[t] for t in pairs["text_minus"]], dtype=torch.long)
    train_mask, test_mask, held = split_pairs(pairs, cfg.holdout_fraction, cfg.seed)
    train_idx = torch.from_numpy(np.flatnonzero(train_mask))
    test_idx = torch.from_numpy(np.flatnonzero(test_mask))
    if len(train_idx) == 0:
        raise TooFewPairs(f"reward model: no training pairs left after holding out "
                         f"{cfg.holdout_fraction:.0%} of {len(set(pairs['id_plus']) | set(pairs['id_minus']))} "
                         "samples; lower reward.holdout_fraction or train on a larger run")

    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # nn.Linear's initialisation draws from the global generator
    head = RewardHead(x.shape[1], hidden)
    seen_rows = torch.unique(torch.cat([plus[train_idx], minus[train_idx]]))
    head.mean.copy_(x[seen_rows].mean(0))
    head.std.copy_(x[seen_rows].std(0, unbiased=False).clamp(min=1e-6))
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    losses = []
    for _ in range(cfg.epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(perm), BATCH_SIZE):
            batch = perm[start:start + BATCH_SIZE]
            margin = head(x[plus[batch]]) - head(x[minus[batch]])
            loss = torch.nn.functional.softplus(-margin).mean()  # = -log sigma(r(plus) - r(minus))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    with torch.no_grad():
        r = head(x)
        margins = r[plus] - r[minus]
    heldout_acc = _accuracy(margins[test_idx])
    n_test = len(test_idx)
    metrics = {
        "pairs": len(pairs), "pairs_train": len(train_idx), "pairs_heldout": n_test,
        "pairs_dropped_mixed": len(pairs) - len(train_idx) - n_test,
        "samples_train": len(set(pairs["id_plus"]) | set(pairs["id_minus"])) - len(held),
        "samples_heldout": len(held),
        "train_accuracy": round(_accuracy(margins[train_idx]), 4),
        "heldout_accuracy": None if not n_test else round(heldout_acc, 4),
        "heldout_accuracy_se": None if not n_test else round(math.sqrt(heldout_acc * (1 - heldout_acc) / n_test), 4),
        # Mean loss over the last pass (epochs=0 trains nothing: the head stays at its initialisation).
        "final_train_loss": round(float(np.mean(losses[-math.ceil(len(train_idx) / BATCH_SIZE):])), 4) if losses else None,
    }
    if not n_test:
        log.warning("reward model: no held-out pairs (holdout_fraction=%s); accuracy not measured",
                    cfg.holdout_fraction)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "nslora_version": _version(),
        "encoder": encoder.meta if encoder is not None else {"name": cfg.encoder, "dim": int(x.shape[1])},
        "head": {"kind": "mlp" if hidden else "linear", "hidden": hidden, "dim": int(x.shape[1]),
                 "orientation": "higher reward = more like the samples the criterion sent to symbolic updates"},
        "training": {"config": to_dict(cfg), "data_hash": pairs_hash(pairs),
                     "epochs_of_run": sorted(int(e) for e in pairs["epoch"].unique()),
                     "criteria": sorted(pairs["criterion"].unique().tolist()), "batch_size": BATCH_SIZE, "weight_decay": WEIGHT_DECAY},
        "metrics": metrics,
    }
    probe = None if encoder is None else torch.from_numpy(encoder([PROBE_TEXT])[0])
    return RewardModel(head.eval(), meta, probe, encoder)


def _version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------------------------------
# The artifact


class RewardModelError(ValueError):
    """A reward model directory that cannot be read, or does not fit the encoder available."""


@dataclass
class RewardModel:
    """A trained reward head plus what it was trained on (meta.json). `score` gives rewards."""

    head: RewardHead
    meta: dict
    probe: torch.Tensor | None = None  # the encoder's embedding of PROBE_TEXT at training time
    _encoder: Encoder | None = field(default=None, repr=False, compare=False)

    @property
    def metrics(self) -> dict:
        return self.meta["metrics"]

    def rewards(self, embeddings: np.ndarray) -> np.ndarray:
        """Rewards of embedding rows (float64)."""
        with torch.no_grad():
            return self.head(torch.as_tensor(np.asarray(embeddings, dtype=np.float32))).double().numpy()

    def check_encoder(self, encoder: Encoder) -> None:
        """Raise `RewardModelError` unless `encoder` computes the features the head was trained on."""
        want = self.meta["encoder"]
        trained_on = want.get("source", {}).get("name", "?")
        available = encoder.meta.get("source", {}).get("name", "?")
        if want.get("name") != encoder.name:
            raise RewardModelError(f"reward model: trained on encoder {want.get('name')!r}, asked to score "
                                   f"with {encoder.name!r}")
        if int(want.get("dim", encoder.dim)) != encoder.dim:
            raise RewardModelError(
                f"reward model: trained on {trained_on} embeddings of size {want.get('dim')}, but the "
                f"available encoder ({available}) gives size {encoder.dim}; score with the base model "
                "the reward model was trained with (model.name of its experiment)")
        if self.probe is not None:
            now = torch.from_numpy(encoder([PROBE_TEXT])[0])
            cosine = float(torch.nn.functional.cosine_similarity(now, self.probe, dim=0))
            if cosine < PROBE_MIN_COSINE:
                raise RewardModelError(
                    f"reward model: the available encoder ({available}) does not compute the embeddings "
                    f"the head was trained on ({trained_on}; probe cosine {cosine:.3f} < "
                    f"{PROBE_MIN_COSINE}); use the same base model as the experiment that trained it")
        if trained_on != available:
            log.warning("reward model trained with %s, scoring with %s (embeddings agree)", trained_on, available)

    def score(self, train: pd.DataFrame, base_dir: Path | str | None = None, precision: str = "auto",
              encoder: Encoder | None = None) -> pd.Series:
        """Rewards of an EXAMPLES table (current question + gold solution), for criteria=reward.

        Args:
            base_dir: the materialised base model (needed by encoder 'base').
            encoder: an already loaded encoder to reuse (else one is built from meta.json).

        Returns:
            Float Series named 'reward', indexed by id; higher = more like the symbolically-updated samples.

        Raises:
            RewardModelError: the encoder available differs from the one the head was trained on.
            ImportError: encoder 'minilm' without its package.
        """
        if encoder is None:
            encoder = self._encoder or make_encoder(self.meta["encoder"]["name"], base_dir, precision)
            self._encoder = encoder
        self.check_encoder(encoder)
        texts = [sample_text(q, s) for q, s in zip(train["question"], train["solution"])]
        values = self.rewards(encoder(texts)) if texts else np.zeros(0)
        return pd.Series(values, index=pd.Index(train["id"].astype(str), name="id"), name="reward")

    def save(self, out_dir: Path | str) -> Path:
        """Write `out_dir` with head.safetensors (weights, standardisation, probe) and meta.json,
        atomically (a half-written directory never replaces a good one)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        if self.probe is not None:
            tensors["probe"] = self.probe.contiguous()
        save_file(tensors, str(tmp / HEAD_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir

    @classmethod
    def load(cls, path: Path | str) -> "RewardModel":
        """Read a directory written by `save`.

        Raises:
            RewardModelError: missing files, or not a reward model of a known format version.
        """
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, head_path = path / META_FILE, path / HEAD_FILE
        if not meta_path.exists() or not head_path.exists():
            raise RewardModelError(f"{path}: not a reward model directory (needs {META_FILE} and {HEAD_FILE}; "
                                   "made by the reward_model stage)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise RewardModelError(f"{meta_path}: format {meta.get('format')!r} version "
                                   f"{meta.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
        tensors = load_file(str(head_path))
        probe = tensors.pop("probe", None)
        head = RewardHead(int(meta["head"]["dim"]), int(meta["head"].get("hidden", 0)))
        head.load_state_dict(tensors)
        return cls(head.eval(), meta, probe)


def fit_reward_model(selections: Sequence[pd.DataFrame], trains: Sequence[pd.DataFrame],
                     base_dir: Path | str | None, cfg: RewardConfig, precision: str = "auto",
                     hidden: int = 0) -> RewardModel:
    """Pairs from the criteria logs -> embeddings with `cfg.encoder` -> trained head (see
    `preference_pairs` and `train_reward_model` for the arguments and errors)."""
    pairs = preference_pairs(selections, trains, cfg.pairs, cfg.seed)
    encoder = make_encoder(cfg.encoder, base_dir, precision)
    return train_reward_model(pairs, embed_pair_texts(pairs, encoder), cfg, encoder=encoder, hidden=hidden)
