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
