"""Unit tests of the shared preprocessing (service/imaging.py): one function each."""

from __future__ import annotations

import numpy as np
import pytest

from service.imaging import (
    ABDOMEN_WINDOW,
    Window,
    apply_window,
    body_mask,
    resize,
    slice_distances,
    slice_order,
    to_hu,
)

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_to_hu_applies_rescale_slope_and_intercept():
    stored = np.array([[0, 1024, 2048]], np.uint16)
    assert to_hu(stored, 1.0, -1024.0).tolist() == [[-1024.0, 0.0, 1024.0]]
    assert to_hu(stored, 0.5, -10.0).tolist() == [[-10.0, 502.0, 1014.0]]


@pytest.mark.parametrize("slope", [0.0, float("nan"), float("inf")])
def test_to_hu_refuses_an_unusable_slope(slope):
    with pytest.raises(ValueError, match="RescaleSlope"):
        to_hu(np.zeros((2, 2), np.uint16), slope, 0.0)


def test_window_maps_its_range_to_zero_one_and_clips():
    hu = np.array([-1000.0, ABDOMEN_WINDOW.low, 50.0, ABDOMEN_WINDOW.high, 3000.0])
    assert apply_window(hu).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="width"):
        Window(center=0, width=0)


def test_slice_order_sorts_head_to_feet_whatever_the_file_order():
    z = [-10.0, 20.0, 5.0, -25.0]
    positions = [[-200.0, -200.0, v] for v in z]
    order = slice_order(positions, AXIAL)
    assert [z[i] for i in order] == [20.0, 5.0, -10.0, -25.0]
    assert slice_distances(positions, AXIAL).tolist() == z


def test_slice_order_rejects_a_broken_orientation():
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        slice_order([[0, 0, 0]], [1, 0, 0, 1, 0, 0])


def test_body_mask_keeps_the_body_with_its_lungs_and_drops_the_table():
    hu = np.full((100, 100), -1000.0)
    yy, xx = np.mgrid[:100, :100]
    body = ((yy - 45) / 35) ** 2 + ((xx - 50) / 40) ** 2 < 1
    hu[body] = 40.0
    lung = ((yy - 40) / 10) ** 2 + ((xx - 35) / 8) ** 2 < 1
    hu[lung] = -850.0
    hu[88:91, 5:95] = 150.0  # the table, separate from the body
    mask = body_mask(hu)
    assert mask[body].all()  # lungs included: holes are filled
    assert not mask[88:91].any()
    assert not mask[0].any()


def test_resize_averages_when_shrinking_by_an_integer_factor():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert resize(image, (2, 2)).tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert resize(image, (4, 4)) is not None and resize(image, (3, 3)).shape == (3, 3)


def test_body_mask_fills_the_same_holes_as_scipy_fill_holes():
    """The one-labelling hole fill equals `ndimage.binary_fill_holes` (4-connected background), also
    for a background region that touches the slice's edge (not a hole) and holes inside holes."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(50):
        hu = ndimage.uniform_filter(np.where(rng.random((48, 64)) < 0.6, 100.0, -1000.0), 3)
        labels, n = ndimage.label(hu > -500)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        expected = ndimage.binary_fill_holes(labels == np.argmax(sizes))
        assert np.array_equal(body_mask(hu), expected)


def test_field_resampling_equals_gaussian_filter_then_map_coordinates():
    """`resample_to_field`'s separable interpolation gives map_coordinates' values (mode "constant":
    air outside the image) to float rounding, and the same body mask, on an off-centre body that the
    480-mm field overhangs."""
    from scipy import ndimage

    from service.imaging import AIR_HU, PatchGeometry, body_centre, resample_to_field

    yy, xx = np.mgrid[:300, :260]
    hu = np.full((300, 260), -1000.0, np.float32)
    hu[((yy - 170) / 110.0) ** 2 + ((xx - 120) / 125.0) ** 2 < 1] = 40.0
    hu[150:160, 100:104] = 2800.0  # metal: a sharp edge
    hu += np.random.default_rng(1).normal(0, 12, hu.shape).astype(np.float32)
    spacing = (0.9, 1.1)
    geometry = PatchGeometry()
    field, mask, _ = resample_to_field(hu, spacing, geometry)

    body = body_mask(hu)
    centre = body_centre(body)
    offsets = (np.arange(geometry.field_px) - (geometry.field_px - 1) / 2.0) * geometry.spacing_mm
    coords = np.stack(np.meshgrid(centre[0] + offsets / spacing[0], centre[1] + offsets / spacing[1], indexing="ij"))
    sigma = tuple(max(0.0, 0.5 * geometry.spacing_mm / s - 0.5) for s in spacing)
    smooth = ndimage.gaussian_filter(hu, sigma)
    expected = ndimage.map_coordinates(smooth, coords, order=1, mode="constant", cval=AIR_HU)
    expected_mask = ndimage.map_coordinates(body.astype(np.float32), coords, order=1, mode="constant") > 0.5
    assert (field == AIR_HU).any()  # the field reaches beyond the image
    assert np.abs(field - expected).max() < 0.01
    assert np.array_equal(mask, expected_mask)
