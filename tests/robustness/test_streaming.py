"""predict on 10,000 files printed nothing until all were done: predictions now come out batch by
batch, and the JSON stays one valid document."""

import json

from transferlab import load_model

from messy import run_main


def test_predictions_come_batch_by_batch(tiny_run, image_folder, monkeypatch):
    predictor = load_model(tiny_run.model_dir)
    calls = []
    engine = predictor.engine

    class Counting:
        device = engine.device

        def __call__(self, images, precision):
            calls.append(len(images))
            return engine(images, precision)

    predictor.engine = Counting()
    files = sorted(image_folder.rglob("*.*"))
    stream = predictor.iter_predictions(files, batch_size=4)
    first = next(stream)
    assert calls == [4] and first.file == str(files[0])  # one batch run, not all ten
    assert len([first, *stream]) == len(files) and len(calls) == 10


def test_streamed_json_and_csv_are_whole_documents(tiny_run, image_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    files = [*sorted(image_folder.rglob("*.png"))[:5], bad]
    result = run_main(capsys, "predict", tiny_run.model_dir, *files, "--format", "json",
                      "--batch-size", "2", "--top-k", "2")
    assert result.returncode == 1 and "bad.jpg" in result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["file"] for p in predictions] == [str(f) for f in files]
    assert "error" in predictions[-1] and len(predictions[0]["top_k"]) == 2
    table = run_main(capsys, "predict", tiny_run.model_dir, *files[:5], "--batch-size", "2")
    assert table.returncode == 0 and table.stdout.count("%") == 5  # one row per image
