"""Per-epoch accuracy: the curve (CSV for `dvc plots`), its picture (PNG, draws offline) and the
headline metrics (pre-trained vs final adapter, with the gain in binomial standard errors)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

CURVE_COLUMNS = ["epoch", "accuracy", "accuracy_strict", "stderr", "n"]


def accuracy_curve(evals: list[dict]) -> pd.DataFrame:
    """One row per evaluated epoch (0 = pre-trained), from the evaluate stages' summaries."""
    rows = [{c: e[c] for c in CURVE_COLUMNS} for e in evals if e.get("evaluated", True)]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).sort_values("epoch").reset_index(drop=True)


def headline(curve: pd.DataFrame) -> dict:
    """Pre-trained vs last evaluated epoch; `gain_z` is the gain over its standard error."""
    first, last = curve.iloc[0], curve.iloc[-1]
    gain = float(last.accuracy - first.accuracy)
    se = math.sqrt(first.stderr ** 2 + last.stderr ** 2)
    return {
        "pretrained_accuracy": float(first.accuracy),
        "final_accuracy": float(last.accuracy),
        "final_accuracy_strict": float(last.accuracy_strict),
        "final_epoch": int(last.epoch),
        "gain": round(gain, 6),
        "gain_z": round(gain / se, 3) if se > 0 else (math.inf if gain > 0 else 0.0),
        "n": int(last.n),
    }


def plot_curve(curve: pd.DataFrame, path: Path | str, title: str = "Test accuracy per epoch") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.errorbar(curve.epoch, curve.accuracy, yerr=curve.stderr, marker="o", capsize=3,
                label="flexible-extract (±1 s.e.)")
    ax.plot(curve.epoch, curve.accuracy_strict, marker="s", linestyle="--", label="strict-match")
    ax.set(xlabel="epoch (0 = pre-trained)", ylabel="accuracy", title=title, ylim=(0, 1.02))
    ax.set_xticks(list(curve.epoch))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path | str) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
