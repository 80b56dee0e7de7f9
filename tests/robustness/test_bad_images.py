"""Every kind of bad or odd image file: decoded right, or refused with a reason; in a data folder the
rest is still used, and the command line names each refused file without a traceback."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from transferlab import ImageFolderData, load_model
from transferlab.data.decode import UnreadableImage, open_rgb, read_info

from conftest import TINY_BACKBONE
from messy import (CASES_BY_NAME, FILE_CASES, huge_jpeg, png_header_only, run_cli, run_main,
                   write_cases)


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda case: case.name)
def test_each_file_is_decoded_or_refused_with_a_reason(case, tmp_path):
    path = tmp_path / case.name
    path.write_bytes(case.make())
    if case.readable:
        image = open_rgb(path)
        assert (image.mode, image.size) == ("RGB", case.size)
        assert read_info(path).width * read_info(path).height == case.size[0] * case.size[1]
    else:
        for read in (open_rgb, read_info):
            with pytest.raises(UnreadableImage, match=case.reason):
                read(path)


def test_odd_modes_decode_to_the_right_pixels(tmp_path):
    paths = write_cases(tmp_path, [CASES_BY_NAME[name] for name in (
        "animated.gif", "multipage.tif", "sixteen-bit.png", "rgba.png", "exif-rotated.jpg")])
    assert open_rgb(paths["animated.gif"]).getpixel((5, 5)) == (255, 0, 0)  # the first frame
    assert open_rgb(paths["multipage.tif"]).getpixel((5, 5)) == (255, 0, 0)  # the first page
    ramp = np.asarray(open_rgb(paths["sixteen-bit.png"]))[0, :, 0]
    assert ramp[0] == 0 and ramp[-1] == 255 and np.all(np.diff(ramp.astype(int)) >= 0)  # scaled, not clipped
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # on white
    sensor = Image.open(paths["exif-rotated.jpg"])
    assert sensor.size == (40, 30) and open_rgb(paths["exif-rotated.jpg"]).size == (30, 40)


def test_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path):
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(huge_jpeg())
    with pytest.raises(UnreadableImage, match="20000x20000 pixels exceeds the limit of 100,000,000"):
        open_rgb(huge)
    assert open_rgb(huge, max_pixels=400_000_000, draft_size=256).mode == "RGB"  # JPEG draft: small
    big_tiff = tmp_path / "big.tif"  # PIL's TIFF decoder checks PIL's own limit once more
    Image.new("1", (14_000, 14_000)).save(big_tiff, compression="group4")
    with pytest.raises(UnreadableImage, match="too many pixels"):
        open_rgb(big_tiff, max_pixels=400_000_000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(60_000, 60_000))  # more than PIL's own bomb limit, too
    with pytest.raises(UnreadableImage, match="exceeds the limit of 1,000"):
        open_rgb(bomb, max_pixels=1_000)
    with pytest.raises(UnreadableImage, match="exceeds the limit"):
        read_info(bomb)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Two classes of good images, with every bad file, odd names, symlinks and system files mixed in."""
    root = tmp_path_factory.mktemp("messy") / "data"
    rng = np.random.default_rng(0)
    elsewhere = root.parent / "elsewhere"  # folders linked in from outside the data folder
    good = {root / "dark [old] (2)": (0, 90, 10), elsewhere / "bright": (165, 256, 12),
            elsewhere / "more dark": (0, 90, 2)}
    for folder, (low, high, count) in good.items():
        folder.mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(low, high, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"photo {index} [{index % 3}] ü.png")
    (root / "brïght café").symlink_to(elsewhere / "bright", target_is_directory=True)
    (root / "dark [old] (2)" / "linked sub-folder").symlink_to(elsewhere / "more dark",
                                                               target_is_directory=True)
    bad = write_cases(root / "dark [old] (2)", [c for c in FILE_CASES if not c.readable])
    odd = write_cases(root / "brïght café", [c for c in FILE_CASES if c.readable])
    dark = root / "dark [old] (2)"
    (dark / "link to photo.png").symlink_to(dark / "photo 0 [0] ü.png")
    (dark / "dangling.png").symlink_to(dark / "no such file.png")
    (dark / "loop.png").symlink_to(dark / "loop.png")
    (dark / "subfolder loop").symlink_to(dark, target_is_directory=True)
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini", ".hidden.png"):
        (dark / junk).write_bytes(b"\0junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._photo.png").write_bytes(b"\0\5\26\7")
    (root / "README.txt").write_text("stray file at the top")
    return {"root": root, "bad": bad, "odd": odd,
            "unreadable_links": ["dangling.png", "loop.png"], "good": 24}


def test_messy_folder_keeps_every_good_image_and_names_every_bad_one(messy_folder, caplog):
    data = ImageFolderData(messy_folder["root"], cache_dir=None)
    scan = data.scan
    assert data.classes == sorted(["dark [old] (2)", "brïght café"])
    expected_bad = set(messy_folder["bad"]) | set(messy_folder["unreadable_links"])
    assert {path.name for path, _ in scan.unreadable} == expected_bad
    for path, reason in scan.unreadable:
        assert reason and "Traceback" not in reason and path.name in caplog.text
        case = CASES_BY_NAME.get(path.name)
        if case:
            assert case.reason and __import__("re").search(case.reason, reason), (path.name, reason)
    used = {image.path.name for image in scan.images}
    assert set(messy_folder["odd"]) <= used and "link to photo.png" in used
    # 24 good photos (2 through a linked sub-folder; the looping link adds none), the odd ones, the link
    assert len(scan.images) == messy_folder["good"] + len(messy_folder["odd"]) + 1
    assert {p.name for p in scan.ignored} >= {".DS_Store", "Thumbs.db", "desktop.ini", ".hidden.png",
                                               "README.txt"}
    # the symlink is a byte-identical copy of its target: kept in the same split
    assert any({"link to photo.png", "photo 0 [0] ü.png"} <= {scan.images[i].path.name for i in group}
               for group in data.duplicates.exact)
    assert sum(len(files) for files in data.split.values()) == len(scan.images)


def test_info_and_train_on_the_messy_folder_name_bad_files_without_a_traceback(messy_folder, tmp_path,
                                                                               capsys):
    root = messy_folder["root"]
    info = run_main(capsys, "info", root, "--json")
    assert info.returncode == 0 and "Traceback" not in info.stderr, info.stderr
    report = json.loads(info.stdout)
    assert len(report["unreadable"]) == len(messy_folder["bad"]) + len(messy_folder["unreadable_links"])

    run_dir = tmp_path / "run"
    trained = run_cli("train", root, "--backbone", TINY_BACKBONE, "--weights", "none", "--out", run_dir,
                      "--cache-dir", tmp_path / "cache", "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stderr
    for name in messy_folder["bad"]:
        assert name in trained.stderr, f"{name} not named in:\n{trained.stderr}"
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["unreadable"]) == len(report["unreadable"])
    assert sum(len(split[name]) for name in ("train", "val", "test")) == report["images"]
    model = load_model(run_dir / "model")
    odd = [root / "brïght café" / name for name in messy_folder["odd"]]
    assert all(not p.error for p in model.predict(odd))

    predicted = run_main(capsys, "predict", run_dir / "model", *(root / "dark [old] (2)" / name
                                                         for name in messy_folder["bad"]), odd[0])
    assert predicted.returncode == 1 and "Traceback" not in predicted.stderr
    errors = [line for line in predicted.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(messy_folder["bad"])  # one line each, naming the file
    assert all(any(name in line for line in errors) for name in messy_folder["bad"])
    assert odd[0].name in predicted.stdout


def test_max_pixels_option_refuses_big_images_by_name(tmp_path, capsys):
    root = tmp_path / "data"
    for name, colour in (("a", "red"), ("b", "blue")):
        (root / name).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (40, 40), colour).save(root / name / f"{index}.png")
    Image.new("RGB", (200, 100), "red").save(root / "a" / "large.png")
    result = run_main(capsys, "info", root, "--max-pixels", 10_000, "--json")
    assert result.returncode == 0, result.stderr
    unreadable = json.loads(result.stdout)["unreadable"]
    assert [os.path.basename(item["file"]) for item in unreadable] == ["large.png"]
    assert "200x100 pixels exceeds the limit of 10,000" in unreadable[0]["reason"]
    assert "--max-pixels" in unreadable[0]["reason"]  # says how to let it in
