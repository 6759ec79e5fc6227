"""Datasets that need no files: scikit-learn's bundled digits and a generated MNIST stand-in.

Both return `Splits` (uint8 images, int64 labels, a description of the source), which
`sources.load_array_dataset` wraps as an `ArrayDataset`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MNIST_IMAGE_SHAPE = (28, 28)


class Splits(NamedTuple):
  """Train and test arrays of a dataset, its number of classes and where it came from."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str


def digits(seed: int = 0, evaluation_fraction: float = 0.2) -> Splits:
  """scikit-learn's bundled 8x8 digits (1,797 images, offline), split 80/20 with `seed`.

  Pixel values 0..16 are rescaled to uint8 0..255 so every dataset shares one pixel range.

  Args:
    seed: seeds the permutation that splits the images.
    evaluation_fraction: the share of the images held out as the test split.
  """
  from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top

  digits = sklearn_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int64)
  num_evaluation = int(round(len(images) * evaluation_fraction))
  permutation = np.random.default_rng(seed).permutation(len(images))
  train_indices, test_indices = permutation[num_evaluation:], permutation[:num_evaluation]
  return Splits(
    train_images=images[train_indices],
    train_labels=labels[train_indices],
    test_images=images[test_indices],
    test_labels=labels[test_indices],
    num_classes=10,
    source=(
      f'sklearn.datasets.load_digits (bundled, 8x8, 0..16 rescaled to 0..255): '
      f'{len(images)} images permuted with np.random.default_rng({seed}).permutation; first '
      f'{num_evaluation} -> test, remaining {len(train_indices)} -> train'
    ),
  )


def synthetic(
  seed: int = 0,
  num_train: int = 2000,
  num_test: int = 500,
  num_classes: int = 10,
  image_shape: tuple[int, int] = MNIST_IMAGE_SHAPE,
) -> Splits:
  """A generated, learnable stand-in for MNIST: class prototypes plus pixel noise.

  Each class has a random sparse 0/1 prototype (about 20% ink); an example is its class
  prototype scaled to 180 plus Gaussian noise (std 50), clipped to uint8. Classes are balanced.
  A small model separates them within a few federated rounds; everything follows from `seed`.

  Args:
    seed: seeds the prototypes, labels and noise.
    num_train: training examples.
    num_test: test examples.
    num_classes: classes (one prototype each).
    image_shape: (height, width) of the images.
  """
  rng = np.random.default_rng(seed)
  prototypes = (rng.random((num_classes,) + image_shape) < 0.2).astype(np.float32) * 180.0

  def sample(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int64)
    noise = rng.normal(0.0, 50.0, size=(num_examples,) + image_shape).astype(np.float32)
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels

  train_images, train_labels = sample(num_train)
  test_images, test_labels = sample(num_test)
  return Splits(
    train_images=train_images,
    train_labels=train_labels,
    test_images=test_images,
    test_labels=test_labels,
    num_classes=num_classes,
    source=(
      f'synthetic (seed {seed}): {num_classes} random sparse class prototypes + Gaussian '
      f'noise (std 50), {num_train} train / {num_test} test'
    ),
  )
