import json
import subprocess
import sys

from typer.testing import CliRunner

from transferlab.cli import app

runner = CliRunner()


def _cli(*args):
    """The installed entry point, as a user runs it (exit codes and stderr included)."""
    return subprocess.run([sys.executable, "-c", "from transferlab.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_help_does_not_import_torch():
    code = "import sys; from transferlab.cli import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True).stdout.strip() == "False"


def test_info_reports_counts_and_duplicates(image_folder):
    result = runner.invoke(app, ["info", str(image_folder), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 40 and report["classes"]["circles"]["images"] == 20
    assert report["duplicate_groups"] == 0 and report["unreadable"] == []
    table = runner.invoke(app, ["info", str(image_folder)])
    assert "circles" in table.output and "duplicates" in table.output


def test_predict_formats_and_errors(tiny_run, image_folder, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = str(image_folder / "circles" / "circles_000.jpg")
    result = _cli("predict", str(tiny_run.model_dir), good, str(bad), "--top-k", "2", "--format", "json")
    assert result.returncode == 1
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions[0]["top_k"]) == 2 and "error" in predictions[1]
    assert "corrupt.jpg" in result.stderr and "Traceback" not in result.stderr
    csv_out = _cli("predict", str(tiny_run.model_dir), good, "--format", "csv")
    assert csv_out.returncode == 0 and csv_out.stdout.splitlines()[0] == (
        "file,rank,label,probability,novelty,unknown")


def test_missing_model_is_one_line(tmp_path):
    result = _cli("predict", str(tmp_path / "nope"), "x.jpg")
    assert result.returncode == 2
    assert "not a model bundle" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_command_writes_a_run(image_folder, tmp_path):
    result = runner.invoke(app, ["train", str(image_folder), "--backbone", "test_efficientnet",
                                 "--weights", "none", "--out", str(tmp_path / "run"), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert "run directory" in result.output


def test_train_head_then_summary_of_the_bundle_and_of_a_backbone(image_folder, tmp_path):
    result = runner.invoke(app, ["train", str(image_folder), "--strategy", "head", "--backbone",
                                 "test_efficientnet", "--weights", "none", "--epochs", "1",
                                 "--out", str(tmp_path / "run"), "--no-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trained 1 epochs" in result.output and (tmp_path / "run" / "history.csv").is_file()
    bundle = runner.invoke(app, ["summary", str(tmp_path / "run" / "model"), "--json"])
    assert bundle.exit_code == 0, bundle.output
    report = json.loads(bundle.output)
    assert report["trainable"] == 256 * 2 + 2  # the linear head it started from the probe
    assert report["total"] == report["trainable"] + report["non_trainable"]
    assert any(row["name"] == "head" and row["output_shape"] == [1, 2] for row in report["layers"])
    table = runner.invoke(app, ["summary", "simple-cnn", "--strategy", "scratch"])
    assert table.exit_code == 0, table.output
    assert "[1, 64, 32, 32]" in table.output and "trainable parameters: 150,466" in table.output
    assert "non-trainable parameters: 0" in table.output
