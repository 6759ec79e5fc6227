"""Small client datasets shared by the tests that build and run a learning process."""

import collections

import numpy as np
import tensorflow as tf

# 8x8 single-channel images, two classes: class 1 is brighter on the top half.
INPUT_SHAPE = (8, 8, 1)


def client_dataset(seed: int, poisoned: bool = False) -> tf.data.Dataset:
  """32 examples in batches of 8; `poisoned` makes every pixel NaN."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 32).astype(np.int32)
  images = rng.normal(0.0, 0.3, [32, *INPUT_SHAPE]).astype(np.float32)
  images[:, :4] += labels[:, None, None, None] * 1.5
  if poisoned:
    images[:] = np.nan
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=images, y=labels)).batch(8)
