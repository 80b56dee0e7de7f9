"""Names a careless user (or an attacker) gives files and classes: spreadsheet formulas, `$` that
matplotlib reads as math, bytes that are not UTF-8; and a crafted predictions.csv that names a file
outside the data set."""

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from transferlab.rundir.predictions import PredictionTable, from_spreadsheet, spreadsheet_safe

from conftest import TINY_BACKBONE
from messy import run_main

FORMULA_CLASS, MATH_CLASS = "=SUM(1+1)", "a$_$b $100-$200"
NOT_UTF8 = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: held by Python as surrogates
FORMULAS = ("=", "+", "-", "@")


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd") / "data"
    rng = np.random.default_rng(0)
    for label, (low, high) in {FORMULA_CLASS: (0, 90), MATH_CLASS: (165, 256)}.items():
        (root / label).mkdir(parents=True)
        for index in range(10):
            Image.fromarray(rng.integers(low, high, (24, 24, 3), dtype=np.uint8)).save(
                root / label / f"{index}.png")
    for name in (NOT_UTF8, "-2+3.png", "@cmd.png"):
        Image.fromarray(rng.integers(0, 90, (24, 24, 3), dtype=np.uint8)).save(
            os.path.join(os.fsencode(root / FORMULA_CLASS), os.fsencode(name)))
    return root


@pytest.fixture(scope="module")
def odd_run(odd_folder, tmp_path_factory):
    from transferlab import train

    return train(odd_folder, backbone=TINY_BACKBONE, weights="none", out=tmp_path_factory.mktemp(
        "odd-run") / "run", cache_dir=str(tmp_path_factory.mktemp("odd-cache")), show_progress=False)


@pytest.mark.parametrize("name", ["=1+1", "+x", "-rm", "@SUM", "\tx", "'=quoted", "plain", "'plain"])
def test_names_round_trip_through_their_spreadsheet_form(name):
    safe = spreadsheet_safe(name)
    assert not safe.startswith(FORMULAS) and from_spreadsheet(safe) == name


def test_predictions_csv_holds_no_formula_and_reads_back_every_name(odd_run, odd_folder):
    raw = (odd_run.dir / "predictions.csv").read_bytes().decode("utf-8", "surrogateescape")
    cells = [cell for row in csv.reader(io.StringIO(raw)) for cell in row]
    assert not [cell for cell in cells if cell.startswith(FORMULAS)]
    table = PredictionTable.read(odd_run.dir / "predictions.csv")
    assert sorted(table.classes) == sorted([FORMULA_CLASS, MATH_CLASS])
    assert all((odd_folder / name).is_file() for name in table.files)  # every name found again


def test_odd_names_never_end_in_a_traceback(odd_run, odd_folder, capsys):
    assert (odd_run.dir / "report.html").stat().st_size > 10_000  # plots drew the $ and = names
    info = run_main(capsys, "info", odd_folder, "--json")
    assert info.returncode == 0 and "Traceback" not in info.stderr
    table = run_main(capsys, "info", odd_folder)
    assert table.returncode == 0, table.stderr
    report = run_main(capsys, "report", odd_run.dir)
    assert report.returncode == 0, report.stderr
    predicted = run_main(capsys, "predict", odd_run.model_dir, odd_folder / FORMULA_CLASS, "--format",
                         "csv")
    assert predicted.returncode == 0, predicted.stderr
    cells = [cell for row in csv.reader(io.StringIO(predicted.stdout)) for cell in row]
    assert len(cells) > 40 and not [cell for cell in cells if cell.startswith(FORMULAS)]


def test_a_report_shows_no_file_from_outside_the_data_set(odd_run, tmp_path, monkeypatch):
    """A crafted predictions.csv naming /somewhere/secret.png as a confidently wrong test image."""
    from transferlab.reporting import plots
    from transferlab.reporting.report import write_report

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    table = PredictionTable.read(odd_run.dir / "predictions.csv")
    rows = table.select("test")
    table.files[rows[0]] = str(secret)
    table.files[rows[1]] = "../../" + secret.name
    table.labels[rows[:2]] = 1 - table.proba[rows[:2]].argmax(1)  # so that both are shown as wrong
    table.write(odd_run.dir / "predictions.csv")
    shown = []
    real = plots.thumbnail
    monkeypatch.setattr(plots, "thumbnail", lambda path: shown.append(path) or real(path))
    write_report(odd_run.dir)
    assert shown and None in shown  # the two crafted rows are listed, without a picture
    assert not [p for p in shown if p is not None and secret.name in str(p)]


def test_a_report_that_cannot_be_drawn_is_one_line(odd_run, monkeypatch, capsys):
    from transferlab.reporting import report

    def broken(*args, **kwargs):
        raise RuntimeError("a renderer bug")

    monkeypatch.setattr(report, "render", broken)
    result = run_main(capsys, "report", odd_run.dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "a renderer bug" in result.stderr
