"""The built-in default dataset: scikit-learn's bundled handwritten digits.

1,797 grayscale 8x8 images of the digits 0-9 (the UCI optical recognition
test set), shipped inside scikit-learn: no download, no file outside the
installed packages. Pixels are integers 0..16.

Choices, documented:

* Images stay at their native 8x8 (no upsampling): the multi-exit models
  accept any H, W >= 8, and 8x8 keeps the README's end-to-end demo within its
  few-minute CPU budget.
* The dataset has no official test split. A stratified test split of
  `TEST_SIZE` images is drawn with a *fixed* seed (`TEST_SEED`), so every run
  is scored on the same images; the validation split (default `VAL_SIZE`) is
  drawn from the rest with the run's `seed`.
* Augmentation: a random shift of up to 1 pixel (pad 1, random 8x8 crop) and
  no flip (a mirrored digit is another symbol).
"""

from typing import Any

import numpy as np

from keras_ee.data import splits as splits_lib

TEST_SIZE = 360
TEST_SEED = 0
VAL_SIZE = 300
AUGMENT_PAD = 1
PIXEL_MAX = 16


def load_digits_arrays() -> dict[str, Any]:
    """The digits as arrays with a fixed stratified test split.

    Returns:
        dict with `x_train` uint8 (1437, 8, 8, 1), `y_train` int64, `x_test`
        uint8 (360, 8, 8, 1), `y_test`, `class_names` ("0" ... "9") and
        `source`. Pixels are 0..16 (scale by 1/16).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)
    if images.shape[1:] != (8, 8) or images.min() < 0 or images.max() > PIXEL_MAX:
        raise ValueError(
            "scikit-learn's digits are expected as 8x8 images with pixels in "
            f"[0, {PIXEL_MAX}]; received shape {images.shape} with range "
            f"[{images.min()}, {images.max()}]."
        )
    images = images.astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, np.int64)
    train_idx, test_idx = splits_lib.stratified_split(labels, TEST_SIZE, seed=TEST_SEED, num_classes=10)
    # Ascending order: the split is a fixed property of the dataset, and
    # the pipelines shuffle the training part anyway.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return {
        "x_train": images[train_idx],
        "y_train": labels[train_idx],
        "x_test": images[test_idx],
        "y_test": labels[test_idx],
        "class_names": [str(d) for d in range(10)],
        "source": "sklearn.datasets.load_digits",
    }
