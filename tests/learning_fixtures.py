"""Small client datasets shared by the tests that build and run a learning process."""

import collections

import numpy as np
import tensorflow as tf

from tff_clipq.experiments import config as config_lib
from tff_clipq.learning import process as process_lib

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


def process_config(
  aggregator: process_lib.AggregatorConfig, **overrides
) -> process_lib.ProcessConfig:
  """A logistic model on `client_dataset`'s task, plain client SGD, with `aggregator`."""
  settings = dict(
    model='logistic',
    input_shape=INPUT_SHAPE,
    num_classes=2,
    aggregator=aggregator,
    client_learning_rate=0.1,
    client_momentum=0.0,
  )
  settings.update(overrides)
  return process_lib.ProcessConfig(**settings)


def tiny_config(output_dir: str, **overrides) -> config_lib.ExperimentConfig:
  """A runner study on synthetic data small enough for a test: 8 clients, 3 per round, 3 rounds."""
  settings = dict(
    dataset='synthetic',
    model='logistic',
    num_clients=8,
    clients_per_round=3,
    rounds=3,
    batch_size=16,
    client_learning_rate=0.05,
    aggregator='clipq',
    bits='4',
    output_dir=output_dir,
  )
  settings.update(overrides)
  return config_lib.ExperimentConfig(**settings)
