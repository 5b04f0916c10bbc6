"""Training curves from a run's Lightning CSV logs: ``altogether plot RUN_DIR [out=PNG]``.

Every ``metrics.csv`` under RUN_DIR is read (CSVLogger writes ``RUN_DIR/logs/version_N/metrics.csv``);
versions are joined in version order, as a resumed run continues its steps. A run of several stages, each
its own run folder under RUN_DIR (the demo's ``pretrain/`` and ``finetune/``), gets one column of panels
per stage, stages in the order they started (their first log file's modification time), since each stage
counts its steps from 0. Plotted series: the ``train/loss`` and ``val/loss`` columns (top panel) and ``lr``
or LearningRateMonitor's ``lr-*`` columns (bottom panel), against ``step`` (the row number where there is
no step column). Missing columns are left out; the empty and non-finite cells CSVLogger leaves in rows that
logged other values are skipped. The PNG's ``Series`` text chunk lists the plotted series, and its
``Stages`` chunk the stages.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .cli import Command, run_cli, setting
from .io import atomic_write_bytes

LOSS_SERIES = ("train/loss", "val/loss")
LR_SERIES = "lr"
DEFAULT_NAME = "training_curves.png"

log = logging.getLogger(__name__)

Series = dict[str, tuple[list[float], list[float]]]


def find_metrics_files(run_dir: str | os.PathLike) -> list[Path]:
    """All ``metrics.csv`` files under ``run_dir``, ``version_2`` before ``version_10``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: [_natural(part) for part in p.parts])
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir} (expected Lightning CSVLogger output)")
    return files


def read_series(run_dir: str | os.PathLike) -> Series:
    """``{series name: (steps, values)}`` for the loss and learning-rate columns that have values, all the
    ``metrics.csv`` files under ``run_dir`` joined as one stage."""
    return _read_files(find_metrics_files(run_dir), run_dir)


def read_stages(run_dir: str | os.PathLike) -> dict[str, Series]:
    """``{stage: series}``: the ``metrics.csv`` files grouped by the run folder that holds their ``logs/``
    (its path under ``run_dir``, ``.`` for ``run_dir`` itself), stages in the order they started."""
    run_dir = Path(run_dir)
    groups: dict[str, list[Path]] = {}
    for path in find_metrics_files(run_dir):
        parts = path.relative_to(run_dir).parts[:-1]
        stage = Path(*parts[:parts.index("logs")]) if "logs" in parts else Path(*parts[:1])
        groups.setdefault(stage.as_posix() or ".", []).append(path)
    ordered = sorted(groups.items(), key=lambda item: item[1][0].stat().st_mtime)
    return {stage: _read_files(files, run_dir / stage) for stage, files in ordered}


def _read_files(files: list[Path], where: str | os.PathLike) -> Series:
    series: Series = {}
    row_number = 0
    for path in files:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [c for c in reader.fieldnames or [] if _is_plotted(c)]
            for row in reader:
                step = _number(row.get("step"))
                x = step if step is not None else float(row_number)
                row_number += 1
                for column in columns:
                    value = _number(row.get(column))
                    if value is not None:
                        steps, values = series.setdefault(column, ([], []))
                        steps.append(x)
                        values.append(value)
    if not series:
        raise ValueError(
            f"no values to plot under {where}: expected columns {', '.join(LOSS_SERIES)} or {LR_SERIES}"
        )
    return series


def plot_run(run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Plot the run's loss and learning-rate curves, one column per stage, to a PNG (default
    ``RUN_DIR/training_curves.png``)."""
    stages = read_stages(run_dir)
    out_path = Path(out_path) if out_path is not None else Path(run_dir) / DEFAULT_NAME
    png = _render(stages, title=Path(run_dir).resolve().name)
    atomic_write_bytes(out_path, png)
    log.info("plotted %s of %s to %s", ", ".join(sorted({n for s in stages.values() for n in s})),
             ", ".join(stages), out_path)
    return out_path


def _render(stages: dict[str, Series], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for series in stages.values() for name in series})
    losses = [name for name in names if name in LOSS_SERIES]
    rates = [name for name in names if name not in LOSS_SERIES]
    rows = [(kind, label) for kind, label in ((losses, "loss"), (rates, "learning rate")) if kind]
    width = 8 if len(stages) == 1 else 5 * len(stages)
    figure, axes = plt.subplots(len(rows), len(stages), sharex="col", figsize=(width, 3.2 * len(rows)),
                                squeeze=False)
    try:
        for column, (stage, series) in enumerate(stages.items()):
            for ax, (kind, label) in zip(axes[:, column], rows):
                for name in kind:
                    if name not in series:
                        continue
                    steps, values = series[name]
                    # Validation is logged rarely: markers keep a handful of points visible.
                    style = {"marker": "o", "markersize": 3} if name.startswith("val") or len(values) < 20 else {}
                    ax.plot(steps, values, label=name, **style)
                ax.set_ylabel(label)
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
                ax.grid(alpha=0.3)
                if ax.lines:
                    ax.legend(loc="best")
            axes[0, column].set_title(title if len(stages) == 1 else f"{title}: {stage}")
            axes[-1, column].set_xlabel("step")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100,
                       metadata={"Series": ", ".join(names), "Stages": ", ".join(stages)})
    finally:
        plt.close(figure)
    return buffer.getvalue()


def _is_plotted(column: str) -> bool:
    return column in LOSS_SERIES or column == LR_SERIES or column.startswith(f"{LR_SERIES}-")


def _number(cell: str | None) -> float | None:
    """A finite float, or None for the empty / NaN / inf cells of rows that logged something else."""
    if cell is None or not cell.strip():
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _natural(text: str) -> list:
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", text)]


@dataclass
class PlotSettings:
    out: Optional[str] = setting(None, f"PNG to write (default: RUN_DIR/{DEFAULT_NAME})")


def _plot(paths: list[str], s: PlotSettings) -> int:
    print(plot_run(paths[0], s.out))
    return 0


def main(argv: list[str]) -> int:
    """``altogether plot RUN_DIR [out=PNG]``."""
    command = Command(__doc__.splitlines()[0], {"RUN_DIR": "training run directory (holds logs/version_N/metrics.csv)"},
                      PlotSettings, _plot)
    return command("altogether plot", argv)


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
