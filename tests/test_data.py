"""make_shapes: shapes, ranges, determinism, masks, two-object images, errors."""

import pytest
import torch

from captum_daam.data import CLASSES, make_shapes


def test_shapes_ranges_and_dtypes():
    images, labels, masks = make_shapes(50, seed=3)
    assert images.shape == (50, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (50, 1) and labels.dtype == torch.int64
    assert masks.shape == (50, 1, 64, 64) and masks.dtype == torch.bool
    assert images.min() >= 0 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() < len(CLASSES) and len(CLASSES) >= 5
    object_pixels = masks.flatten(1).sum(1)
    assert (object_pixels > 40).all() and (object_pixels < 0.5 * 64 * 64).all()


def test_deterministic_per_seed():
    first = make_shapes(20, seed=11, objects=2)
    again = make_shapes(20, seed=11, objects=2)
    other = make_shapes(20, seed=12, objects=2)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_every_class_occurs_with_random_colours_sizes_and_positions():
    images, labels, masks = make_shapes(400, seed=0)
    counts = torch.bincount(labels[:, 0], minlength=len(CLASSES))
    assert (counts > 40).all()
    areas = masks.flatten(1).sum(1).float()
    assert areas.std() > 20
    rows = torch.arange(64).reshape(1, 64, 1).float()
    centre_rows = (masks[:, 0] * rows).flatten(1).sum(1) / areas
    assert centre_rows.min() < 25 and centre_rows.max() > 39
    object_colours = (images * masks).flatten(2).sum(2) / areas.unsqueeze(1)
    assert object_colours.std(dim=0).min() > 0.15


def test_the_object_differs_from_the_background_inside_its_mask():
    images, _, masks = make_shapes(30, seed=5)
    mask = masks[:, 0].unsqueeze(1).expand_as(images)
    # pixels of an object share one colour (small texture), the background varies
    object_spread = torch.stack([images[i][mask[i]].reshape(3, -1).std(1).max() for i in range(30)])
    assert (object_spread < 0.08).all()


def test_clutter_outside_the_objects():
    images, _, masks = make_shapes(30, seed=6)
    saturation = images.amax(1) - images.amin(1)
    vivid_outside = ((saturation > 0.45) & ~masks[:, 0]).flatten(1).sum(1)
    assert (vivid_outside > 10).float().mean() > 0.9  # distractor strokes and dots


def test_two_objects_have_different_classes_and_separate_masks():
    images, labels, masks = make_shapes(200, seed=2, objects=2)
    assert labels.shape == (200, 2) and masks.shape == (200, 2, 64, 64)
    assert (labels[:, 0] != labels[:, 1]).all()
    assert not (masks[:, 0] & masks[:, 1]).any()
    assert (masks.flatten(2).sum(2) > 20).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [({"n": -1}, "non-negative"), ({"n": 2, "objects": 3}, "1 or 2"), ({"n": 2, "size": 8}, "32")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_shapes(**kwargs)
