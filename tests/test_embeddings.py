import numpy as np

from transferlab.models.backbones import create_backbone
from transferlab.data.folder import ImageFolderData
from transferlab.inference.embeddings import embed_files
from transferlab.data.transforms import Preprocessing

from conftest import TINY_BACKBONE


def _inputs(image_folder):
    data = ImageFolderData(image_folder)
    images = data.scan.images[:12]
    return [im.path for im in images], [im.sha256 for im in images]


def test_second_call_reads_the_cache(image_folder, tmp_path):
    backbone = create_backbone(TINY_BACKBONE, "none")
    pre = Preprocessing.from_model(backbone)
    paths, hashes = _inputs(image_folder)
    first, stats = embed_files(backbone, paths, hashes, pre, cache_dir=tmp_path, batch_size=5,
                               show_progress=False, precision="32")
    assert stats.embedded == 12 and stats.cached == 0
    assert first.shape == (12, backbone.num_features)
    second, stats = embed_files(backbone, paths, hashes, pre, cache_dir=tmp_path, show_progress=False,
                                precision="32")
    assert stats.embedded == 0 and stats.cached == 12
    np.testing.assert_array_equal(first, second)
    other = create_backbone(TINY_BACKBONE, "none")  # other random weights: other cache key
    _, stats = embed_files(other, paths[:2], hashes[:2], pre, cache_dir=tmp_path, show_progress=False,
                           precision="32")
    assert stats.embedded == 2


def test_bf16_embeddings_stay_close_to_fp32(image_folder):
    backbone = create_backbone(TINY_BACKBONE, "none")
    pre = Preprocessing.from_model(backbone)
    paths, hashes = _inputs(image_folder)
    exact, _ = embed_files(backbone, paths, hashes, pre, precision="32", show_progress=False)
    fast, _ = embed_files(backbone, paths, hashes, pre, precision="bf16", show_progress=False)
    cosine = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
    assert cosine.min() > 0.98
