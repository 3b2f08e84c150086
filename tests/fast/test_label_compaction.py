"""Label arrays are held as broadcasts of their distinct part (issue 16: on BERT-base they
took 383 MB, as much as the activations)."""

from __future__ import annotations

import numpy as np

from onnxprune.structure.labels import column_labels, compact


def test_token_axes_are_kept_once():
    labels = np.broadcast_to(np.arange(12).reshape(1, 1, 12), (2, 128, 12)).copy()
    out = compact(labels)
    np.testing.assert_array_equal(out, labels)
    assert out.base is not None and out.base.size == 12      # one row behind the view
    assert not out.flags.writeable


def test_varying_labels_stay_as_they_are():
    labels = np.arange(24).reshape(2, 12)
    assert compact(labels) is labels


def test_mixed_axes():
    """Heads × tokens × channels where only the token axis repeats."""
    per_head = np.arange(3 * 4).reshape(3, 1, 4)
    labels = np.broadcast_to(per_head, (3, 50, 4)).copy()
    out = compact(labels)
    np.testing.assert_array_equal(out, labels)
    assert out.base.size == 12


def test_column_labels_take_one_row():
    labels = column_labels((1, 128, 3072), 100)
    assert labels.shape == (1, 128, 3072) and labels[0, 5, 7] == 107
    assert labels.base.size == 3072
