"""Compare experiments: `dvc exp show --json` -> one row per run -> a table like the paper's Table 2
and accuracy-per-epoch plots like its Fig. 2/3, with the spread over seeds.

    runs = runs_from_exp_show(json.loads(output_of("dvc exp show --json")))
    table = summarize_runs(runs)
    deltas = differences_from_lora(runs, correct_by_rev)   # paired bootstrap over seeds and questions
    # Runs of an earlier session or machine, from a committed report (its runs.csv + correctness.csv):
    runs, correct_by_rev = merge_earlier(runs, correct_by_rev, *read_report_runs("results/gsm8k_qwen"))
    markdown = markdown_table(table, deltas)
    plot_epochs(runs, "results/accuracy_per_epoch.png")
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from nslora.methods import METHODS
from nslora.reporting import save_figure

GROUP = ["method", "criteria", "engine"]
EPOCH_FILE = re.compile(r"metrics/eval/epoch_(\d+)\.json$")


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = value


# The report's rows: the pipeline's methods, and nslora_sysprompt (nslora with
# symbolic.update_system_prompt, the paper's last row).
GRID_METHODS = (*METHODS, "nslora_sysprompt")
SYMBOLIC_METHODS = (*(name for name, m in METHODS.items() if m.symbolic_epochs), "nslora_sysprompt")
# Rows compared with LoRA question by question (their final-epoch predictions are needed): every
# other row that trains the same LoRA adapter (symbolic updates, or two-stage's optimised prompt).
COMPARED_METHODS = (*(name for name, m in METHODS.items() if m.adapter == "lora" and name != "lora"),
                    "nslora_sysprompt")
PAIRED_METHODS = ("lora", *COMPARED_METHODS)


def _method_label(params: dict) -> str:
    method = params.get("method", "nslora")
    if method == "nslora" and params.get("symbolic.update_system_prompt"):
        return "nslora_sysprompt"  # the paper's "NS-LoRA + system prompt" row
    return method


def _engine_label(params: dict) -> str:
    """'hint', or the engine with the teacher model ('local:embedded:qwen2.5-coder-1.5b'): rows
    that differ only in their teacher must not be averaged together."""
    engine = params.get("teacher.engine", "")
    model = params.get("teacher.model")
    return f"{engine}:{model}" if engine in ("local", "openai") and model else engine


def _record(name: str, rev: str, data: dict) -> dict | None:
    params: dict = {}
    _flatten("", (data.get("params") or {}).get("params.yaml", {}).get("data", {}), params)
    metrics = {path: (m or {}).get("data", {}) for path, m in (data.get("metrics") or {}).items()}
    final = metrics.get("metrics/eval.json", {})
    if "final_accuracy" not in final:
        return None  # not run, failed, or from before evaluation existed
    # Teacher work: symbolic epochs, and two_stage's prompt optimisation before training.
    teacher_work = [m for path, m in sorted(metrics.items())
                    if path.startswith("metrics/symbolic/") or path == "metrics/initial_prompt.json"]
    row = {
        "experiment": name or rev, "rev": rev,
        "method": _method_label(params), "criteria": params.get("criteria", ""),
        "engine": _engine_label(params), "seed": params.get("train.seed"),
        # The training precision `model.precision` resolved to (auto: bf16 only where it is fast).
        "precision": "+".join(sorted({m["precision"] for path, m in metrics.items()
                                      if path.startswith("metrics/train/") and "precision" in m})) or None,
        "pretrained_accuracy": final["pretrained_accuracy"], "accuracy": final["final_accuracy"],
        "accuracy_strict": final.get("final_accuracy_strict"), "n": final.get("n"),
        "final_epoch": final.get("final_epoch"),
        "selected": sum(m.get("selected", 0) for m in teacher_work),
        "accepted": sum(m.get("accepted", 0) for m in teacher_work),
        # TextGrad's proposals (made, with its tags): whether a teacher rewrote anything at all.
        "proposals": sum((m.get("proposals") or {}).get("made", 0) for m in teacher_work),
        "tagged": sum((m.get("proposals") or {}).get("tagged", 0) for m in teacher_work),
        "teacher_calls": sum((m.get("teacher") or {}).get("calls", 0) for m in teacher_work),
        "seconds": round(sum(m.get("seconds", 0) for path, m in metrics.items()
                             if path.startswith(("metrics/train/", "metrics/eval/", "metrics/symbolic/",
                                                 "metrics/initial_prompt"))
                             and isinstance(m.get("seconds"), (int, float))), 1),
    }
    if row["method"] not in SYMBOLIC_METHODS:
        row["criteria"] = "-"  # no per-sample selection
        if row["method"] != "two_stage":
            row["engine"] = "-"  # numerical only: no teacher
    for path, m in metrics.items():
        match = EPOCH_FILE.search(path)
        if match and m.get("evaluated", True) and "accuracy" in m:
            row[f"epoch_{int(match.group(1))}"] = m["accuracy"]
    return row


def runs_from_exp_show(exp_show: list[dict]) -> pd.DataFrame:
    """One row per finished experiment (and the workspace/baseline rows when they have results)."""
    rows = []
    for commit in exp_show:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs") or []:
                record = _record(revision.get("name") or exp.get("name"), revision.get("rev", ""),
                                 revision.get("data") or {})
                if record:
                    rows.append(record)
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ValueError("no finished experiment with metrics/eval.json in `dvc exp show` (run the "
                         "comparison first: nslora compare ... --run; runs based on an earlier commit: "
                         "nslora report --all-commits)")
    return _ordered(frame)


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns in record order with the epochs last (numerically), rows by group, seed and name."""
    epoch_cols = sorted((c for c in frame.columns if c.startswith("epoch_")), key=lambda c: int(c[6:]))
    ordered = [c for c in frame.columns if not c.startswith("epoch_")] + epoch_cols
    return frame[ordered].sort_values(GROUP + ["seed", "experiment"]).reset_index(drop=True)


# A report's per-question record (correctness.csv), next to its runs.csv: what a later report needs
# to pair these runs with new ones without their DVC cache (experiments live in one workspace).
CORRECTNESS_COLUMNS = ["experiment", "rev", "id", "correct"]


def correctness_table(runs: pd.DataFrame, correct_by_rev: dict[str, pd.Series]) -> pd.DataFrame:
    """Long table of each paired run's final-epoch correctness, one row per (run, question)."""
    parts = [pd.DataFrame({"experiment": row.experiment, "rev": row.rev,
                           "id": correct_by_rev[row.rev].index.astype(str),
                           "correct": correct_by_rev[row.rev].to_numpy().astype(int)})
             for row in runs.itertuples() if row.rev in correct_by_rev]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CORRECTNESS_COLUMNS)
    return table.sort_values(["experiment", "id"]).reset_index(drop=True)


def write_report_runs(runs: pd.DataFrame, correct_by_rev: dict[str, pd.Series], directory: Path | str) -> None:
    """DIR/runs.csv (one row per run) and DIR/correctness.csv, as `read_report_runs` reads them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    runs.to_csv(directory / "runs.csv", index=False, float_format="%.6g")
    correctness_table(runs, correct_by_rev).to_csv(directory / "correctness.csv", index=False)


def read_report_runs(directory: Path | str) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """The runs of an earlier report (`nslora report --out DIR`): DIR/runs.csv and DIR/correctness.csv."""
    directory = Path(directory)
    paths = [directory / "runs.csv", directory / "correctness.csv"]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path}: missing; --earlier takes a directory written by `nslora report --out`")
    runs = pd.read_csv(paths[0], dtype={"rev": str, "experiment": str})
    correct = pd.read_csv(paths[1], dtype={"rev": str, "experiment": str, "id": str})
    for path, frame, needed in ((paths[0], runs, GROUP + ["experiment", "rev", "seed", "accuracy"]),
                                (paths[1], correct, CORRECTNESS_COLUMNS)):
        missing = sorted(set(needed) - set(frame.columns))
        if missing:
            raise ValueError(f"{path}: columns {missing} missing; write it again with `nslora report`")
    runs[GROUP] = runs[GROUP].fillna("")  # a blank criterion or engine reads back as NaN
    return runs, {rev: pd.Series(group["correct"].to_numpy().astype(bool), index=group["id"].to_numpy())
                  for rev, group in correct.groupby("rev", sort=False)}


def merge_earlier(runs: pd.DataFrame, correct_by_rev: dict[str, pd.Series], earlier: pd.DataFrame,
                  earlier_correct: dict[str, pd.Series]) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """Add an earlier report's runs to these; a run name present in both keeps the current one.
    Runs trained in another precision (another machine's `auto`) are refused: they are other results."""
    kept = earlier[~earlier["experiment"].isin(set(runs["experiment"]))]
    ours, theirs = (set(frame["precision"].dropna()) if "precision" in frame else set() for frame in (runs, kept))
    if ours and theirs and ours != theirs:
        raise ValueError(f"the earlier runs trained in {sorted(theirs)}, these in {sorted(ours)}: a report mixing "
                         "them would average different computations; set model.precision explicitly and "
                         "rerun on a machine that has it (bf16 on a CPU needs AVX512-BF16 or AMX)")
    merged = _ordered(pd.concat([runs, kept], ignore_index=True)) if len(kept) else runs
    return merged, correct_by_rev | {rev: earlier_correct[rev] for rev in kept["rev"] if rev in earlier_correct}


def summarize_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (method, criteria, engine)."""
    grouped = runs.groupby(GROUP, sort=False)
    table = grouped.agg(seeds=("seed", "nunique"), accuracy_mean=("accuracy", "mean"),
                        accuracy_std=("accuracy", "std"), pretrained=("pretrained_accuracy", "mean"),
                        selected=("selected", "mean"), accepted=("accepted", "mean"),
                        teacher_calls=("teacher_calls", "mean"), seconds=("seconds", "mean"))
    return table.reset_index().fillna({"accuracy_std": 0.0})


def paired_bootstrap(ours: np.ndarray, theirs: np.ndarray, resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy difference and its 95% percentile interval for two methods evaluated on the
    same questions with the same seeds: arrays of 0/1 correctness, shape (seeds, questions).

    Seeds and questions are both resampled (two levels), so the interval carries training noise
    (which seed) as well as test-set noise (which questions); pairing by seed and question removes
    what the two methods share."""
    if ours.shape != theirs.shape or ours.ndim != 2:
        raise ValueError(f"paired_bootstrap: shapes {ours.shape} and {theirs.shape} must be equal (seeds, questions)")
    diff = ours.astype(float) - theirs.astype(float)
    rng = np.random.default_rng(seed)
    n_seeds, n_questions = diff.shape
    stats = np.empty(resamples)
    for b in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        questions = rng.integers(0, n_questions, n_questions)
        stats[b] = diff[np.ix_(seeds, questions)].mean()
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def differences_from_lora(runs: pd.DataFrame, correct_by_rev: dict[str, pd.Series],
                          resamples: int = 10_000) -> pd.DataFrame:
    """Symbolic and two-stage rows minus LoRA, paired by seed and test question. `correct_by_rev`
    maps a run's rev to its final-epoch correctness indexed by question id."""
    lora = runs[runs["method"] == "lora"].drop_duplicates("seed").set_index("seed")
    rows = []
    for key, group in runs[runs["method"].isin(COMPARED_METHODS)].groupby(GROUP, sort=False):
        seeds = sorted(set(group["seed"]) & set(lora.index))
        if not seeds:
            continue
        ours, theirs = [], []
        for seed in seeds:
            mine = correct_by_rev[group.loc[group["seed"] == seed, "rev"].iloc[0]]
            base = correct_by_rev[lora.loc[seed, "rev"]]
            if set(mine.index) != set(base.index):
                raise ValueError(f"{key} seed {seed}: evaluated on other questions than LoRA; "
                                 "compare runs with the same data and eval params")
            ours.append(mine.sort_index().to_numpy())
            theirs.append(base.sort_index().to_numpy())
        delta, low, high = paired_bootstrap(np.array(ours), np.array(theirs), resamples)
        rows.append(dict(zip(GROUP, key)) | {"paired_seeds": len(seeds), "delta": delta,
                                             "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=GROUP + ["paired_seeds", "delta", "ci_low", "ci_high"])


METHOD_NAMES = {"nslora": "NS-LoRA", "lora": "LoRA", "prefix": "Prefix-tuning", "two_stage": "Two-stage",
                "lora_sysprompt": "LoRA + system prompt", "nslora_sysprompt": "NS-LoRA + system prompt"}


def markdown_table(table: pd.DataFrame, deltas: pd.DataFrame | None = None) -> str:
    """The paper's Table 2 layout, with NS-LoRA − LoRA (95% paired bootstrap interval) per row."""
    lookup = {} if deltas is None else {tuple(r[g] for g in GROUP): r for _, r in deltas.iterrows()}
    lines = ["| method | criterion | engine | seeds | accuracy % (mean ± std) | − LoRA, points [95% CI] "
             "| selected | accepted | teacher calls | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pre = table["pretrained"].mean()
    lines.append(f"| Pre-trained | - | - | - | {100 * pre:.1f} | - | - | - | - | - |")
    for row in table.itertuples():
        d = lookup.get((row.method, row.criteria, row.engine))
        delta = "-" if d is None else f"{100 * d['delta']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
        lines.append(
            f"| {METHOD_NAMES.get(row.method, row.method)} | {row.criteria} | {row.engine} | {row.seeds} | "
            f"{100 * row.accuracy_mean:.1f} ± {100 * row.accuracy_std:.1f} | {delta} | {row.selected:.0f} | "
            f"{row.accepted:.0f} | {row.teacher_calls:.0f} | {row.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def plot_epochs(runs: pd.DataFrame, path: Path | str) -> Path:
    """Accuracy per epoch, one panel per method (the paper's Fig. 2/3) with a line per criterion and
    engine: mean over seeds, shaded min-max; LoRA dashed in every panel as the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epoch_cols = [c for c in runs.columns if c.startswith("epoch_")]
    epochs = [int(c[6:]) for c in epoch_cols]
    methods = list(dict.fromkeys(runs["method"]))
    columns = min(3, len(methods))
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), dpi=120,
                             sharex=True, sharey=True, squeeze=False)
    lora = runs[runs["method"] == "lora"][epoch_cols].astype(float).mean()
    for ax, method in zip(axes.flat, methods):
        if method != "lora" and lora.notna().any():
            ax.plot(epochs, lora.values, "--", color="gray", label="LoRA")
        for key, group in runs[runs["method"] == method].groupby(["criteria", "engine"], sort=False):
            values = group[epoch_cols].astype(float)
            label = " / ".join(k for k in key if k not in ("-", "")) or METHOD_NAMES.get(method, method)
            ax.plot(epochs, values.mean().values, marker="o", label=f"{label} (n={len(group)})")
            ax.fill_between(epochs, values.min().values, values.max().values, alpha=0.15)
        ax.set_title(METHOD_NAMES.get(method, method))
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (0 = pre-trained)")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    fig.suptitle("Accuracy per epoch (mean over seeds, shaded min-max)")
    return save_figure(fig, path)


def experiment_grid(methods: list[str], criteria: list[str], engines: list[str], seeds: list[int]) -> list[dict]:
    """The runs of a comparison: criteria and engines vary only for methods with symbolic updates.
    `nslora_sysprompt` is NS-LoRA that also refines the system prompt (the paper's last row)."""
    grid = []
    for method in methods:
        symbolic = method in SYMBOLIC_METHODS
        for criterion in (criteria if method == "nslora" else criteria[:1]):
            # two_stage optimises its prompt from a teacher's critiques: never the hint engine.
            usable = [e for e in engines if e != "hint"] if method == "two_stage" else engines
            for engine in (usable if symbolic else usable[:1]):
                if method.endswith("sysprompt") and engine == "hint":
                    continue  # refining a prompt needs a teacher's critiques
                for seed in seeds:
                    name = f"{method}-{criterion}-{engine}-s{seed}" if symbolic else f"{method}-s{seed}"
                    grid.append({"name": name.replace("_", "-"),
                                 "set": {"method": "nslora" if method == "nslora_sysprompt" else method,
                                         "symbolic.update_system_prompt": str(method == "nslora_sysprompt").lower(),
                                         "criteria": criterion, "teacher.engine": engine, "train.seed": seed}})
    return grid
