
import numpy as np

from transferlab import load_model
from transferlab.rundir.predictions import PredictionTable
from transferlab.inference.predictor import expand_inputs


def test_round_trip_predicts_like_the_run(tiny_run, image_folder):
    # torch, as the run measured: a graph of this bundle that another test cached would be auto's,
    # and bf16 graphs stray from torch's bf16 by 2e-2 on this tiny random-weight model
    predictor = load_model(tiny_run.model_dir, engine="torch")
    assert predictor.classes == ["circles", "squares"]
    files = sorted(image_folder.rglob("*.*"))[:6]
    proba, errors = predictor.predict_proba(files, precision="32")
    again, _ = load_model(tiny_run.model_dir, engine="torch").predict_proba(files, precision="32")
    np.testing.assert_array_equal(proba, again)
    assert errors == [""] * 6
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    top = predictor.predict(files[:1], top_k=2)[0]
    assert [label for label, _ in top.top_k] == [predictor.classes[i] for i in np.argsort(-proba[0])]
    # the saved bundle predicts the run's own val and test images as the run did (predictions.csv,
    # from the cached embeddings; in bf16 the head's last layer then ran in fp32, in the bundle in
    # bf16 too: a few 1e-3 apart)
    run = PredictionTable.read(tiny_run.dir / "predictions.csv")
    loaded, _ = predictor.predict_proba([image_folder / f for f in run.files],
                                        precision=tiny_run.metrics["precision"]["embedding"])
    np.testing.assert_allclose(loaded, run.proba, atol=1e-2)
    clear = np.abs(run.proba[:, 0] - 0.5) > 1e-2
    np.testing.assert_array_equal(loaded.argmax(1)[clear], run.proba.argmax(1)[clear])


def test_unreadable_files_get_an_error_and_others_a_prediction(tiny_run, image_folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    good = next(image_folder.rglob("*.png"))
    predictor = load_model(tiny_run.model_dir)
    results = predictor.predict([bad, good, tmp_path / "missing.png"])
    assert results[0].error and not results[1].error and results[2].error
    alone, _ = predictor.predict_proba([good])  # the bad files cost the good one nothing
    top = results[1].to_dict()["top_k"][0]
    assert top["label"] == predictor.classes[alone[0].argmax()]
    assert abs(top["probability"] - alone[0].max()) < 1e-6


def _copy_bundle(tiny_run, tmp_path):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(tiny_run.model_dir, target)
    return target


def test_saving_over_a_bundle_replaces_it_whole(tiny_run, tmp_path):
    from transferlab.inference.bundle import load_network, save_model
    from transferlab.models.heads import HeadSpec
    from transferlab.data.transforms import Preprocessing

    net, config = load_network(tiny_run.model_dir)
    target = _copy_bundle(tiny_run, tmp_path)
    save_model(net, target, backbone=config.backbone, classes=["a", "b"],
               head=HeadSpec.from_dict(config.head.to_dict()),
               preprocessing=Preprocessing.from_dict(config.preprocessing.to_dict()))
    assert load_model(target).classes == ["a", "b"]
    assert (target / "labels.txt").read_text(encoding="utf-8") == "a\nb\n"
    assert not (target / "README.md").exists()  # the old bundle's card went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind


def test_expand_inputs_takes_files_folders_and_globs(image_folder):
    pattern = str(image_folder / "circles" / "*.png")
    paths = expand_inputs([str(image_folder / "squares"), pattern])
    assert len(paths) == 20 + 10
