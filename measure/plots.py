"""The pictures: training curves and the ablation tables as PNG (matplotlib, files only).

    curves(run_root, path)               a run's log.jsonl curves: SFT loss terms, FPO loss and reward accuracy
    ablation_tables(summary, ...)        the ablation tables: our means and stds beside the paper's numbers

(evaluate.plot_evidence draws one answer's evidence.)
"""
from __future__ import annotations

import json
from pathlib import Path

from support.files import atomic_path


CURVES = {"sft": ("sft", "gnd", "cons"), "fpo": ("fpo", "rewards/accuracies")}  # what curves() draws per stage


def curves(run_root, path) -> dict:
    """A PNG of a run's training curves from its log.jsonl files: the SFT loss terms, and for FPO
    the preference loss and the reward accuracy, against the step. Returns what it drew:
    {stage: {term: (steps, values)}} (stages without a log are left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = {}
    for stage, terms in CURVES.items():
        log = Path(run_root) / stage / "log.jsonl"
        if not log.is_file():
            continue
        rows = [r for r in map(json.loads, log.read_text(encoding="utf-8").splitlines()) if "step" in r]
        drawn[stage] = {t: ([r["step"] for r in rows], [r[t] for r in rows]) for t in terms}
    fig, axes = plt.subplots(1, max(1, len(drawn)), figsize=(6 * max(1, len(drawn)), 3.5), squeeze=False)
    for ax, (stage, series) in zip(axes[0], drawn.items()):
        for term, (steps, values) in series.items():
            ax.plot(steps, values, label=term, lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return drawn


def ablation_tables(summary, tables, metrics, paper, path) -> None:
    """Ablation tables as grouped bars, one panel per table and metric: ours (mean, std as error bars)
    beside the paper's. summary {row: {metric: (mean, std, n)}} (ablations.tables); tables {title:
    rows}; metrics: the column names; paper {row: one number per metric}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(metrics), len(tables), figsize=(12, 3.2 * len(metrics)), squeeze=False)
    for j, (title, rows) in enumerate(tables.items()):
        rows = [r for r in rows if r in summary]
        for i, k in enumerate(metrics):
            ax = axes[i, j]
            x = range(len(rows))
            ax.bar([v - 0.2 for v in x], [summary[r][k][0] for r in rows], 0.4,
                   yerr=[summary[r][k][1] for r in rows], capsize=3, label="ours (synthetic, tiny)")
            ax.bar([v + 0.2 for v in x], [paper[r][i] for r in rows], 0.4, label="paper (E.T.Bench, 3.8B)")
            ax.set_xticks(list(x), rows)
            ax.set_title(f"{title}: {k}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
