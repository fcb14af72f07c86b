"""The synthetic scenes drawn as pixels: deterministic, faithful to the scene, same captions."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from xmodaler_accel.data import build_synthetic, read_karpathy
from xmodaler_accel.data.render import (
    ANNOTATIONS_FILE,
    CANVAS_RGB,
    COLOUR_RGB,
    draw_shape,
    render_scene,
    write_rendered_scenes,
)
from xmodaler_accel.data.scenes import COLOURS, SHAPES
from xmodaler_accel.data.synthetic import SyntheticConfig, split_scenes

TINY = SyntheticConfig(num_train=6, num_val=2, num_test=3, feat_dim=8)


def scenes(count=40, seed=3):
    config = SyntheticConfig(seed=seed, num_train=count)
    return [scene for scene, _, _ in split_scenes("train", config)]


def test_render_is_deterministic_uint8_rgb():
    first, again = scenes(5), scenes(5)
    for a, b in zip(first, again):
        image = render_scene(a, size=48)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, render_scene(b, size=48))


@pytest.mark.parametrize("size", [64, 128])
def test_each_object_centre_has_its_colour(size):
    checked = 0
    for scene in scenes():
        image = render_scene(scene, size=size).astype(int)
        for index, obj in enumerate(scene.objects):
            x1, y1, x2, y2 = scene.boxes[scene.region_of(index), :4]
            x, y = int((x1 + x2) / 2 * size), int((y1 + y2) / 2 * size)
            expected = np.array(COLOUR_RGB[COLOURS[obj.colour]])
            assert np.abs(image[y, x] - expected).max() <= 12, (SHAPES[obj.shape], image[y, x])
            checked += 1
    assert checked > 80


def test_objects_sit_in_their_grid_cell():
    """The coloured pixels of a lone object's colour lie in the object's cell of the 3x3 grid."""
    for scene in scenes(20):
        image = render_scene(scene, size=96).astype(int)
        colours = [o.colour for o in scene.objects]
        for obj in scene.objects:
            if colours.count(obj.colour) > 1:
                continue
            match = np.abs(image - COLOUR_RGB[COLOURS[obj.colour]]).max(axis=2) <= 4
            ys, xs = np.nonzero(match)
            row, col = obj.row_col
            assert len(xs) > 10
            assert int(np.median(ys)) // 32 == row and int(np.median(xs)) // 32 == col


def test_every_shape_draws_differently():
    masks = {}
    for shape in SHAPES:
        image = Image.new("RGB", (64, 64), CANVAS_RGB)
        draw_shape(ImageDraw.Draw(image), shape, (8, 8, 56, 56), (255, 0, 0))
        masks[shape] = np.asarray(image)[..., 1] == 0
        assert masks[shape][32, 32], shape  # the centre is covered
    for a, b in itertools.combinations(SHAPES, 2):
        assert (masks[a] != masks[b]).sum() > 40, (a, b)


def test_unknown_shape_is_refused():
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="oval"):
        draw_shape(ImageDraw.Draw(image), "oval", (0, 0, 8, 8), (0, 0, 0))


def test_rendered_split_has_the_synthetic_captions_and_ids(tmp_path):
    """The Karpathy JSON reads back with the captions and image ids of the synthetic split of
    the same seed; every PNG is the scene drawn."""
    path = write_rendered_scenes(tmp_path / "rendered", TINY, size=32)
    assert path == tmp_path / "rendered" / ANNOTATIONS_FILE
    entries = read_karpathy(path)
    synthetic = build_synthetic(tmp_path / "cache", num_train=6, num_val=2, num_test=3, feat_dim=8)
    for split in ("train", "val", "test"):
        rows, table = entries[split], synthetic[split]
        assert [e.image_id for e in rows] == table["image_id"]
        assert [e.captions for e in rows] == table["captions"]
        assert [e.raw_captions for e in rows] == table["raw_captions"]
    images = json.loads(path.read_text())["images"]
    assert len(images) == 11
    scene = next(iter(split_scenes("val", TINY)))[0]
    first_val = next(i for i in images if i["split"] == "val")
    png = np.asarray(Image.open(tmp_path / "rendered" / "images" / first_val["filename"]))
    np.testing.assert_array_equal(png, render_scene(scene, size=32))
