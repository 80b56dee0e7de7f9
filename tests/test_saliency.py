"""Grad-CAM saliency maps: the layer chosen for each kind of backbone, the maps, the overlays, the
report's maps beside the wrong thumbnails, and `predict --explain`."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from transferlab.cli import app
from transferlab.data.transforms import Preprocessing, normalize
from transferlab.inference.bundle import WEIGHTS_FILE
from transferlab.inference.saliency import (Target, _as_grid, grad_cam, overlay, overlay_names,
                                            save_overlays, target_layer)
from transferlab.models.backbones import create_backbone
from transferlab.models.network import build_network
from transferlab.reporting.report import write_report

from conftest import TINY_BACKBONE
from test_cli import _cli

runner = CliRunner()
# (backbone, cut layer, input side): a timm CNN, a ViT with a class token, both cut, and SimpleCNN
NETWORKS = {"cnn": (TINY_BACKBONE, None, 64), "vit": ("test_vit", None, 160),
            "cut-cnn": (TINY_BACKBONE, 1, 64), "cut-vit": ("test_vit", 1, 160),
            "simple-cnn": ("simple-cnn", None, 128)}


def _network(kind: str):
    name, cut, side = NETWORKS[kind]
    torch.manual_seed(0)
    pre = Preprocessing(input_size=(3, side, side))
    net, _ = build_network(create_backbone(name, "none", cut), pre, 3)
    return net.eval(), pre


def test_target_layer_is_the_last_feature_stage_of_a_timm_cnn():
    net, _ = _network("cnn")
    model = net.backbone
    target = target_layer(net)
    assert target.module is model.get_submodule(model.feature_info[-1]["module"])
    assert target.channels == model.feature_info[-1]["num_chs"] and not target.use_input


def test_target_layer_of_a_vit_is_its_last_blocks_input():
    net, _ = _network("vit")
    target = target_layer(net)
    assert target.module is net.backbone.blocks[-1]
    assert target.use_input and target.prefix_tokens == net.backbone.num_prefix_tokens == 1


@pytest.mark.parametrize("kind", ["cut-cnn", "cut-vit"])
def test_target_layer_of_a_cut_backbone_is_the_stage_it_is_cut_at(kind):
    net, _ = _network(kind)
    model = net.backbone.model
    target = target_layer(net)
    assert target.module is model.get_submodule(model.feature_info[1]["module"])
    assert not target.use_input


def test_target_layer_of_simple_cnn_is_its_last_convolution():
    net, _ = _network("simple-cnn")
    assert target_layer(net).module is net.backbone.features[3]


@pytest.mark.parametrize("kind", NETWORKS)
def test_grad_cam_gives_one_normalised_map_per_image_at_the_input_size(kind):
    net, pre = _network(kind)
    side = pre.input_size[1]
    images = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8)
    maps, classes = grad_cam(net, images, pre)
    assert maps.shape == (3, side, side) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert np.allclose(maps.reshape(3, -1).max(1), 1.0), "every map has evidence with random weights"
    with torch.no_grad():
        top = net(normalize(images, pre, channels_last=False)).argmax(1)
    assert classes.tolist() == top.tolist(), "the top-1 class by default"
    assert not net.training and all(p.grad is None for p in net.parameters())
    _, chosen = grad_cam(net, images, pre, classes=[2, 0, 1])
    assert chosen.tolist() == [2, 0, 1]


@pytest.mark.parametrize("kind", NETWORKS)
def test_grad_cam_records_only_from_its_layer_on_and_gives_the_full_graphs_maps(kind):
    """Autograd starts at the target layer (the layers before it held most of the memory of a
    batch's maps); the maps are those of the textbook way, the whole forward recorded."""
    from transferlab.inference import saliency

    net, pre = _network(kind)
    side = pre.input_size[1]
    images = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    target = target_layer(net)
    recording = {}

    def note(where):
        def hook(*_):
            recording.setdefault(where, torch.is_grad_enabled())
        return hook

    first = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    hooks = [first.register_forward_hook(note("first")), net.head.register_forward_hook(note("head"))]
    maps, chosen = grad_cam(net, images, pre)
    for hook in hooks:
        hook.remove()
    assert recording == {"first": False, "head": True}

    captured = []  # the textbook way: the input requires grad, every layer records
    hook = (target.module.register_forward_pre_hook(lambda m, i: captured.append(i[0]) and None)
            if target.use_input else
            target.module.register_forward_hook(lambda m, i, o: captured.append(o) and None))
    logits = net(normalize(images, pre, channels_last=False).requires_grad_(True))
    hook.remove()
    score = logits.gather(1, torch.as_tensor(chosen).view(-1, 1)).sum()
    gradients, = torch.autograd.grad(score, captured[-1])
    expected = saliency._weighted(saliency._as_grid(captured[-1].detach(), target, side, side),
                                  saliency._as_grid(gradients, target, side, side), (side, side))
    assert np.allclose(maps, expected.numpy(), atol=1e-5)


def test_tokens_and_channels_last_maps_are_laid_out_as_nchw():
    tokens = torch.arange(13 * 4, dtype=torch.float32).reshape(1, 13, 4)  # a class token, 12 patches
    grid = _as_grid(tokens, Target(torch.nn.Identity(), 4, prefix_tokens=1), 30, 40)
    assert grid.shape == (1, 4, 3, 4)  # 12 patches of a 3:4 input: 3 rows of 4
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 1])
    nhwc = torch.randn(2, 5, 6, 8)
    assert torch.equal(_as_grid(nhwc, Target(torch.nn.Identity(), 8), 5, 6), nhwc.permute(0, 3, 1, 2))


def test_overlay_is_an_rgb_picture_of_the_input_size():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    picture = overlay(image, np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30))
    assert picture.mode == "RGB" and picture.size == (30, 20)
    pixels = np.asarray(picture)
    assert pixels[0, 0, 2] > pixels[0, 0, 0] and pixels[-1, -1, 0] > pixels[-1, -1, 2]  # blue to red


def test_overlay_names_are_unique_for_files_of_the_same_stem():
    assert overlay_names(["a/x.png", "b/x.jpg", "c/X.png", "y.webp"]) == ["x.png", "x-2.png", "X-3.png",
                                                                        "y.png"]


def test_save_overlays_writes_one_png_per_readable_image(image_folder, tmp_path):
    net, pre = _network("cnn")
    files = sorted(image_folder.rglob("*.png"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    written = save_overlays(net, pre, [*files, broken], tmp_path / "maps", batch_size=2)
    assert [p.name for p in written] == overlay_names(files)
    for path in written:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.size == (64, 64)


def test_predict_explain_writes_one_png_per_image(tiny_run, image_folder, tmp_path):
    files = [str(p) for p in sorted(image_folder.rglob("*.png"))[:4]]
    result = runner.invoke(app, ["predict", str(tiny_run.model_dir), *files, "--explain",
                                 str(tmp_path / "maps"), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(overlay_names(files))
    assert "4 saliency maps written" in result.output


def test_predict_explain_needs_the_torch_backend(tiny_run, image_folder, tmp_path):
    result = _cli("predict", str(tiny_run.model_dir), str(image_folder), "--explain",
                  str(tmp_path / "maps"), "--backend", "onnx")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "only used with backend torch" in result.stderr and "--explain" in result.stderr
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("run", ["tiny_run", "tiny_head_run"])  # extract and head bundles
def test_report_shows_a_saliency_map_beside_each_wrong_thumbnail(run, request):
    html = (request.getfixturevalue(run).dir / "report.html").read_text(encoding="utf-8")
    wrong = html.split('id="wrong"')[1].split("<h2")[0]
    assert wrong.count('class="thumb"') > 0, "a random tiny model gets some test images wrong"
    assert wrong.count('class="saliency" src="data:image/jpeg;base64,') == wrong.count('class="thumb"')
    assert "Grad-CAM" in wrong and "predicted class" in wrong


def test_report_without_a_loadable_model_still_shows_the_thumbnails(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.dir, run)
    (run / "model" / WEIGHTS_FILE).unlink()
    html = write_report(run).read_text(encoding="utf-8")
    wrong = html.split('id="wrong"')[1].split("<h2")[0]
    assert 'class="thumb"' in wrong and 'class="saliency"' not in wrong and "Grad-CAM" not in wrong
