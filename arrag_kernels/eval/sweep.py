"""Hyperparameter sweeps over a 2-D grid (DAiD: lam x tau), chosen on one split, written as JSON + heatmaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm


def sweep_grid(evaluate: Callable[[float, float], dict], rows: list, cols: list, row_name: str = "lam",
               col_name: str = "tau", progress: bool = True) -> dict:
    """``evaluate(row, col) -> {metric: value}`` on every grid cell -> ``{row_name, col_name, "cells"}``."""
    if not rows or not cols:
        raise ValueError(f"sweep: expected non-empty {row_name} and {col_name} lists, got {rows} and {cols}")
    cells = []
    with tqdm(total=len(rows) * len(cols), desc=f"sweep {row_name} x {col_name}", disable=not progress) as bar:
        for r in rows:
            for c in cols:
                cells.append({row_name: r, col_name: c, **evaluate(r, c)})
                bar.update()
    return {"row": row_name, "col": col_name, row_name: list(rows), col_name: list(cols), "cells": cells}


def best_cell(sweep: dict, metric: str, lower_is_better: bool = True) -> dict:
    """The cell with the best ``metric`` (first one on ties, i.e. the smallest row and column values)."""
    key = (lambda c: c[metric]) if lower_is_better else (lambda c: -c[metric])
    return min(sweep["cells"], key=key)


def save_heatmap(sweep: dict, metric: str, path: str | Path, title: str | None = None, fmt: str = "{:.3f}") -> Path:
    """A heatmap PNG of ``metric`` over the sweep grid (rows: ``sweep["row"]``, columns: ``sweep["col"]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = sweep[sweep["row"]], sweep[sweep["col"]]
    values = [[next(c[metric] for c in sweep["cells"] if c[sweep["row"]] == r and c[sweep["col"]] == k) for k in cols]
              for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.6 * len(rows) + 1.6))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(k) for k in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(sweep["col"])
    ax.set_ylabel(sweep["row"])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title or metric)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
