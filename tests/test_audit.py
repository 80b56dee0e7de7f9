"""The data audit (label issues, outliers, conflicts, image quality) and acting on it (--exclude,
--relabel), on tiny synthetic embeddings and images where the answer is known."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from transferlab import ImageFolderData, train
from transferlab.cli import app
from transferlab.data.decode import read_info
from transferlab.data.quality import measure_all, quality_flags
from transferlab.data.synthetic import make_image_folder
from transferlab.errors import ConfigError
from transferlab.evaluation.labels import (class_thresholds, confident_joint, estimated_errors,
                                          find_label_issues, out_of_fold_probabilities)
from transferlab.evaluation.outliers import find_outliers, label_conflicts
from transferlab.rundir.audit import LABEL_ISSUES_COLUMNS, read_table
from transferlab.workflows.audit import audit

from conftest import SHARED_FACE_MASK, TINY_BACKBONE, needs_real_weights_and_data

runner = CliRunner()


def _real_weights_and_data(test):
    for mark in needs_real_weights_and_data():
        test = mark(test)
    return test


def _two_clusters(per_class=60, dims=16, seed=0):
    rng = np.random.default_rng(seed)
    centre = np.zeros(dims)
    centre[0] = 3.0
    x = np.concatenate([rng.normal(size=(per_class, dims)) + centre,
                        rng.normal(size=(per_class, dims)) - centre])
    y = np.repeat([0, 1], per_class)
    return x, y


def test_a_planted_mislabeled_point_is_ranked_first():
    x, y = _two_clusters()
    x[7] = np.eye(16)[0] * 4.0  # deep inside class 0 ...
    y[7] = 1  # ... labelled 1
    proba, folds = out_of_fold_probabilities(x, y, np.arange(len(y)), num_classes=2, folds=5)
    found = find_label_issues(proba, y)
    assert folds == 5
    assert found.issues[0].index == 7
    assert (found.issues[0].given, found.issues[0].suggested) == (1, 0)
    assert found.issues[0].score == pytest.approx(proba[7, 0] - proba[7, 1])


def test_confident_learning_thresholds_and_estimated_counts():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7],  # labelled 0: t_0 = (0.9+0.8+0.3)/3
                      [0.1, 0.9], [0.2, 0.8], [0.4, 0.6]])  # labelled 1: t_1 = (0.9+0.8+0.6)/3
    labels = np.array([0, 0, 0, 1, 1, 1])
    found = find_label_issues(proba, labels)
    assert found.thresholds == pytest.approx([2.0 / 3, 2.3 / 3])
    # image 2: p(0)=0.3 < t_0 and p(1)=0.7 < t_1 = 0.767: no confident class, not counted;
    # image 5: neither p(1)=0.6 nor p(0)=0.4 reaches its threshold: the joint has no errors
    assert found.issues == []
    proba[2] = [0.1, 0.9]  # now class 1 is confident for image 2: one error in row 0
    found = find_label_issues(proba, labels)
    assert [(i.index, i.suggested) for i in found.issues] == [(2, 1)]
    assert found.issues[0].score == pytest.approx(0.8)


def test_pruning_by_noise_rate_flags_the_planted_flips_only():
    """Three classes of 20 clean images (p = 0.8 for their class), plus two images of class 1
    labelled 0, one of class 0 labelled 2, and a hard but correct image labelled 1 that no class is
    confident about: the confident joint counts the flips, and exactly they are flagged."""
    rows = [[0.8 if k == c else 0.1 for k in range(3)] for c in range(3) for _ in range(20)]
    labels = [c for c in range(3) for _ in range(20)]
    planted = {60: (0, 1), 61: (0, 1), 62: (2, 0)}  # index: (given, true class)
    rows += [[0.1, 0.85, 0.05], [0.05, 0.9, 0.05], [0.85, 0.05, 0.1], [0.3, 0.45, 0.25]]
    labels += [0, 0, 2, 1]
    proba, labels = np.array(rows), np.array(labels)
    joint = confident_joint(proba, labels, class_thresholds(proba, labels))
    assert joint.tolist() == [[20, 2, 0], [0, 20, 0], [1, 0, 20]]  # image 63 is not counted
    errors = estimated_errors(joint, labels)
    assert errors.tolist() == [[0, 2, 0], [0, 0, 0], [1, 0, 0]]
    found = find_label_issues(proba, labels)
    assert {x.index: (x.given, x.suggested) for x in found.issues} == planted
    assert [x.index for x in found.issues] == [61, 60, 62]  # margins 0.85, 0.75, 0.75
    assert found.issues[0].score == pytest.approx(0.85)


def test_duplicate_groups_stay_within_one_fold():
    """Three copies of a mislabeled image in one group: none of them vouches for the others."""
    x, y = _two_clusters()
    groups = np.arange(len(y))
    for i in (3, 4, 5):
        x[i], y[i], groups[i] = np.eye(16)[0] * 4.0, 1, 3
    proba, _ = out_of_fold_probabilities(x, y, groups, num_classes=2, folds=5)
    found = find_label_issues(proba, y)
    assert {i.index for i in found.issues[:3]} == {3, 4, 5}


def test_a_far_away_point_is_an_outlier():
    rng = np.random.default_rng(1)  # embeddings point in the direction of their class, as ReLU ones do
    x = np.abs(rng.normal(size=(80, 16))) + np.repeat(np.eye(16)[[0, 1]] * 8.0, 40, axis=0)
    y = np.repeat([0, 1], 40)
    x[10] = np.eye(16)[5] * 8.0  # in class 0, pointing elsewhere
    outliers = find_outliers(x, y)
    assert outliers.flagged[0] == 10
    assert outliers.neighbours == 5 and outliers.threshold < outliers.scores[10]
    assert len(outliers.flagged) <= 3


def test_outliers_in_tiny_classes_and_copies():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    outliers = find_outliers(x, np.array([0, 0, 0, 0, 1]))  # k = 3 in class 0, none in class 1
    assert np.isnan(outliers.scores[4]) and outliers.flagged[:1] == [3]


def test_cross_class_duplicates_are_conflicts():
    assert label_conflicts([[0, 1], [2, 3, 4]], [0, 0, 1, 1, 0]) == [[2, 3, 4]]


def test_blank_and_tiny_images_get_quality_flags(tmp_path):
    paths = {"blank": tmp_path / "blank.png", "tiny": tmp_path / "tiny.png",
             "long": tmp_path / "long.png", "fine": tmp_path / "fine.png"}
    rng = np.random.default_rng(0)
    Image.new("RGB", (64, 64), (250, 250, 250)).save(paths["blank"])
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(paths["tiny"])
    Image.fromarray(rng.integers(0, 255, (40, 400, 3), dtype=np.uint8)).save(paths["long"])
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths["fine"])
    images = [read_info(p) for p in paths.values()]
    flags = {images[f.index].path.stem: f.flags
             for f in quality_flags(images, measure_all(images, tmp_path / "cache"))}
    assert flags == {"blank": ["uniform"], "tiny": ["small"], "long": ["aspect"]}
    assert measure_all(images, tmp_path / "cache") == measure_all(images)  # cached = computed


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Shapes, plus a circle copied into squares (a conflict), a blank and a tiny image."""
    root = make_image_folder(tmp_path_factory.mktemp("messy") / "shapes", per_class=12, size=48)
    shutil.copy(root / "circles" / "circles_000.jpg", root / "squares" / "copied_circle.jpg")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(root / "circles" / "black.png")
    noise = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "squares" / "tiny.png")  # not uniform: no copy of black.png
    return root


def test_audit_writes_its_files_and_page(messy_folder, tmp_path):
    result = audit(messy_folder, out=tmp_path / "audit", backbone=TINY_BACKBONE, weights="none",
                   folds=3, cache_dir=str(tmp_path / "cache"), show_progress=False)
    files = {p.name for p in result.dir.iterdir()}
    assert {"label_issues.csv", "outliers.csv", "conflicts.csv", "quality.csv", "audit.json",
            "audit.html"} <= files
    with open(result.dir / "label_issues.csv", newline="") as handle:
        assert tuple(next(csv.reader(handle))) == LABEL_ISSUES_COLUMNS
    conflicts = read_table(result.dir / "conflicts.csv")
    assert {(r["file"], r["label"]) for r in conflicts} == {("circles/circles_000.jpg", "circles"),
                                                            ("squares/copied_circle.jpg", "squares")}
    quality = {r["file"]: r["flags"] for r in read_table(result.dir / "quality.csv")}
    assert quality["circles/black.png"] == "uniform" and quality["squares/tiny.png"] == "small"
    summary = json.loads((result.dir / "audit.json").read_text())
    assert summary["counts"]["conflict_groups"] == 1 and summary["parameters"]["folds"] == 3
    page = (result.dir / "audit.html").read_text()
    assert "copied_circle.jpg" in page and "data:image/jpeg;base64," in page
    assert "http://" not in page and "https://" not in page
    with pytest.raises(ConfigError, match="already holds results"):
        audit(messy_folder, out=tmp_path / "audit", backbone=TINY_BACKBONE, weights="none",
              show_progress=False)


def test_audit_command(messy_folder, tmp_path):
    result = runner.invoke(app, ["audit", str(messy_folder), "--backbone", TINY_BACKBONE, "--weights",
                                 "none", "--folds", "2", "--out", str(tmp_path / "a"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "label issues" in result.output and (tmp_path / "a" / "audit.html").is_file()


def _write_csv(path, header, *rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def test_exclude_and_relabel_change_the_split_and_are_recorded(image_folder, tmp_path):
    drop = _write_csv(tmp_path / "drop.csv", ["file", "score"], ["circles/circles_002.jpg", "0.9"],
                      ["squares/squares_000.jpg", "0.5"])
    fix = _write_csv(tmp_path / "fix.csv", ["file", "label"], ["circles/circles_004.jpg", "squares"])
    data = ImageFolderData(image_folder, exclude=drop, relabel=fix, cache_dir=None)
    files = [f for name in ("train", "val", "test") for f in data.relative_files(name)]
    assert len(files) == 38 and "circles/circles_002.jpg" not in files
    record = data.split_record()
    assert record["excluded"] == ["circles/circles_002.jpg", "squares/squares_000.jpg"]
    assert record["relabelled"] == [{"file": "circles/circles_004.jpg", "from": "circles",
                                     "to": "squares"}]
    labels = {item["file"]: item["label"] for name in ("train", "val", "test") for item in record[name]}
    assert labels["circles/circles_004.jpg"] == "squares"

    run = train(data, backbone=TINY_BACKBONE, weights="none", out=tmp_path / "run", cache_dir=None,
                show_progress=False)
    recorded = json.loads((run.dir / "run.json").read_text())["data"]
    assert recorded["exclude"] == record["excluded"]
    assert recorded["relabel"] == {"circles/circles_004.jpg": "squares"}
    assert (run.dir / "audit" / "label_issues.csv").is_file()  # extract audits its training split
    assert run.metrics["audit"]["images"] == run.metrics["split"]["train"]
    assert 'id="audit"' in (run.dir / "report.html").read_text()
    split = (run.dir / "split.json").read_text()
    resumed = train(resume=run.dir, show_progress=False)  # the same lists, without the CSVs
    assert (run.dir / "split.json").read_text() == split and resumed.metrics["split"]["excluded"] == 2


@pytest.mark.parametrize("kind, header, rows, message", [
    ("exclude", ["name"], [["circles/circles_000.jpg"]], "no column named file"),
    ("exclude", ["file"], [["circles/circles_000.jpg"], ["circles/nope.jpg"]],
     "row 3: 'circles/nope.jpg' is not an image of"),
    ("relabel", ["file", "label"], [["circles/circles_000.jpg", "triangles"]],
     "row 2: label 'triangles' is not a class of"),
    ("relabel", ["file", "label"], [["circles/circles_000.jpg", "squares"],
                                    ["circles/circles_000.jpg", "circles"]],
     "row 3: circles/circles_000.jpg is listed again with another label ('squares' in row 2"),
    ("relabel", ["file", "suggested_label"], [["circles/circles_000.jpg", "squares"]],
     "no column named label"),
])
def test_bad_csvs_name_the_file_and_row(image_folder, tmp_path, kind, header, rows, message):
    path = _write_csv(tmp_path / f"{kind}.csv", header, *rows)
    with pytest.raises(ConfigError, match=f"--{kind} {path}.*{message}".replace("(", r"\(")):
        ImageFolderData(image_folder, cache_dir=None, **{kind: path}).scan


def test_a_bad_csv_is_one_line_on_the_command_line(image_folder, tmp_path):
    path = _write_csv(tmp_path / "fix.csv", ["file", "label"], ["circles/circles_000.jpg", "ovals"])
    result = subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()", "train",
                             str(image_folder), "--relabel", str(path), "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "fix.csv row 2" in lines[0] and "use one of circles, squares" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flips", [6])
@_real_weights_and_data
def test_planted_flips_in_real_photos_are_found(tmp_path, flips):
    """60 face-mask photos per class with 6 labels flipped (5%): the audit finds most of them."""
    root = tmp_path / "face-mask"
    classes = sorted(d.name for d in SHARED_FACE_MASK.iterdir() if d.is_dir())
    flipped = set()
    for label in classes:
        other = next(c for c in classes if c != label)
        for n, path in enumerate(sorted((SHARED_FACE_MASK / label).iterdir())[:60]):
            target = other if n % 20 == 7 else label  # 3 per class
            (root / target).mkdir(parents=True, exist_ok=True)
            (root / target / path.name).symlink_to(path)
            if target != label:
                flipped.add(f"{target}/{path.name}")
    assert len(flipped) == flips
    result = audit(root, out=tmp_path / "audit", cache_dir=str(tmp_path / "cache"), show_progress=False)
    flagged = [row["file"] for row in read_table(result.dir / "label_issues.csv")]
    assert len(flipped & set(flagged)) >= flips - 1, flagged
    assert len(set(flagged) - flipped) <= 2, flagged


def test_evaluate_takes_the_same_exclude_and_relabel_as_train(tiny_run, image_folder, tmp_path):
    """Measured against the corrected labels, without the excluded files; with --split, the split
    train made with the same CSVs."""
    drop = _write_csv(tmp_path / "drop.csv", ["file"], ["circles/circles_002.jpg"])
    fix = _write_csv(tmp_path / "fix.csv", ["file", "label"], ["circles/circles_004.jpg", "squares"])
    edits = ["--exclude", str(drop), "--relabel", str(fix)]
    for split in ("all", "test"):
        result = CliRunner().invoke(app, ["evaluate", str(tiny_run.model_dir), str(image_folder),
                                          *edits, "--split", split, "--out", str(tmp_path / split),
                                          "--quiet"])
        assert result.exit_code == 0, result.output
        with open(tmp_path / split / "predictions.csv", newline="", encoding="utf-8") as handle:
            labels = {row["file"]: row["label"] for row in csv.DictReader(handle)}
        expected = ImageFolderData(image_folder, exclude=drop, relabel=fix, cache_dir=None)
        files = (sorted(f for name in ("train", "val", "test") for f in expected.relative_files(name))
                 if split == "all" else sorted(expected.relative_files("test")))
        assert sorted(labels) == files and "circles/circles_002.jpg" not in labels
        if "circles/circles_004.jpg" in labels:
            assert labels["circles/circles_004.jpg"] == "squares"
    assert len(files) < 39  # the last one was the test split
