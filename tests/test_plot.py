"""Training-curve plot from Lightning CSVLogger output."""

import csv
import math

import pytest
from PIL import Image

from altogether.plot import main, plot_run, read_series, read_stages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, header, rows):
    """Write a metrics.csv the way CSVLogger does: one row per log call, other cells left empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def lightning_rows(first_step, last_step):
    rows = []
    for step in range(first_step, last_step):
        rows.append({"epoch": 0, "step": step, "train/loss": 3.0 / (1 + step), "lr": 1e-4 * min(1, step / 10)})
        if step % 10 == 9:
            rows.append({"epoch": 0, "step": step, "val/loss": 2.5 / (1 + step)})
    rows.append({"epoch": 0, "step": last_step, "train/loss": float("nan")})  # a NaN cell must be dropped
    return rows


HEADER = ["epoch", "lr", "step", "train/loss", "val/loss"]


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "logs" / "version_0" / "metrics.csv", HEADER, lightning_rows(0, 30))
    write_metrics(run / "logs" / "version_1" / "metrics.csv", HEADER, lightning_rows(30, 50))
    return run


def test_plot_is_a_png_with_the_expected_series(run_dir):
    path = plot_run(run_dir)
    assert path == run_dir / "training_curves.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    with Image.open(path) as image:
        assert image.size == (800, 640)  # two panels
        assert image.text["Series"] == "lr, train/loss, val/loss"


def test_series_values_join_versions_and_skip_empty_cells(run_dir):
    series = read_series(run_dir)
    steps, losses = series["train/loss"]
    assert steps == [float(s) for s in range(50)]
    assert all(math.isfinite(v) for v in losses) and losses[0] == pytest.approx(3.0)
    val_steps, _ = series["val/loss"]
    assert val_steps == [9.0, 19.0, 29.0, 39.0, 49.0]
    assert series["lr"][1][10] == pytest.approx(1e-4)


def test_missing_columns_give_a_single_panel(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "metrics.csv", ["train/loss"], [{"train/loss": 1.0}, {"train/loss": 0.5}, {"train/loss": ""}])
    path = plot_run(run, tmp_path / "out" / "curve.png")
    with Image.open(path) as image:
        assert image.size == (800, 320)
        assert image.text["Series"] == "train/loss"
    assert read_series(run)["train/loss"] == ([0.0, 1.0], [1.0, 0.5])  # row numbers stand in for steps


def test_learning_rate_monitor_columns(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "metrics.csv", ["step", "lr-AdamW", "val/loss"], [{"step": 1, "lr-AdamW": 0.1, "val/loss": ""}])
    assert set(read_series(run)) == {"lr-AdamW"}


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "run directory not found"),
        ("empty", "no metrics.csv"),
        ("no_columns", "no values to plot"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, layout, message):
    from altogether.cli import run_cli

    run = tmp_path / "run"
    if layout != "missing":
        run.mkdir()
    if layout == "no_columns":
        write_metrics(run / "metrics.csv", ["epoch", "step"], [{"epoch": 0, "step": 1}])
    assert run_cli(main, [str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_cli_writes_png(run_dir, tmp_path, capsys):
    from altogether.cli import run_cli

    out = tmp_path / "curves.png"
    assert run_cli(main, [str(run_dir), f"out={out}"]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out.strip() == str(out)


def test_a_run_of_several_stages_gets_one_column_per_stage_in_the_order_they_ran(tmp_path):
    """The demo's layout: RUN/pretrain and RUN/finetune, each a run folder counting its steps from 0."""
    import os

    run = tmp_path / "demo"
    write_metrics(run / "pretrain" / "logs" / "version_0" / "metrics.csv", HEADER, lightning_rows(0, 30))
    write_metrics(run / "pretrain" / "logs" / "version_1" / "metrics.csv", HEADER, lightning_rows(30, 40))
    write_metrics(run / "finetune" / "logs" / "version_0" / "metrics.csv", HEADER, lightning_rows(0, 20))
    for stage, when in (("pretrain", 1_000_000), ("finetune", 2_000_000)):  # finetune sorts first by name
        for path in (run / stage).rglob("metrics.csv"):
            os.utime(path, (when, when))
    stages = read_stages(run)
    assert list(stages) == ["pretrain", "finetune"]
    assert stages["pretrain"]["train/loss"][0] == [float(s) for s in range(40)]  # versions joined, steps rise
    assert stages["finetune"]["train/loss"][0] == [float(s) for s in range(20)]
    assert stages["finetune"]["val/loss"][0] == [9.0, 19.0]
    path = plot_run(run)
    with Image.open(path) as image:
        assert image.size == (1000, 640)  # two stages side by side, loss over learning rate
        assert image.text["Stages"] == "pretrain, finetune"
        assert image.text["Series"] == "lr, train/loss, val/loss"
