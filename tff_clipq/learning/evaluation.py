"""Centralized evaluation of a run's global model, as trained or as deployed (quantized).

`evaluate` copies the process state's trainable weights into a plain Keras model of the same
architecture (optionally through the run's B-bit quantizer, `deployment.quantize_weights`) and
evaluates it on held-out data.
"""

from __future__ import annotations

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.learning import deployment
from tff_clipq.learning import models
from tff_clipq.learning import process as process_lib


def build_evaluation_model(config: process_lib.ProcessConfig) -> tf.keras.Model:
  """A plain (float) Keras model of the run's architecture, compiled for centralized evaluation."""
  keras_model = models.create_keras_model(config.model, config.input_shape, config.num_classes)
  keras_model.compile(
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name='accuracy')],
  )
  return keras_model


def assign_trainable_weights(
  process: tff.learning.templates.LearningProcess,
  state,
  keras_model: tf.keras.Model,
  deployed_by: Optional[process_lib.ProcessConfig] = None,
) -> None:
  """Copies the global model's trainable weights (same order as TFF's) into `keras_model`.

  With `deployed_by`, the weights go through that run's B-bit quantizer first
  (`deployment.quantize_weights`).

  Args:
    process: the run's learning process.
    state: its state, whose model weights are copied.
    keras_model: a model of the same architecture (e.g. `build_evaluation_model`); modified.
    deployed_by: optional run configuration whose quantizer is applied to the weights first.
  """
  trainable = list(process.get_model_weights(state).trainable)
  if deployed_by is not None:
    agg = deployed_by.aggregator
    trainable = deployment.quantize_weights(
      trainable,
      process_lib.bits_per_tensor(deployed_by),
      'max_abs' if agg.method == 'tff_encoded' else agg.clipping,
      agg.min_size_to_quantize,
      agg.per_channel,
    )
  for variable, value in zip(keras_model.trainable_variables, trainable, strict=True):
    variable.assign(value)


def evaluate(
  process: tff.learning.templates.LearningProcess,
  state,
  keras_model: tf.keras.Model,
  test_data: tf.data.Dataset,
  deployed_by: Optional[process_lib.ProcessConfig] = None,
) -> collections.OrderedDict:
  """Centralized held-out loss and accuracy of the global model.

  Args:
    process: the run's learning process.
    state: its state, whose model is evaluated.
    keras_model: a compiled model of the same architecture (`build_evaluation_model`).
    test_data: batched, yielding OrderedDict(x=..., y=...), the clients' element structure.
    deployed_by: evaluate the model quantized as this run deploys it (see `deployment`).
  """
  assign_trainable_weights(process, state, keras_model, deployed_by)
  features_and_labels = test_data.map(lambda batch: (batch['x'], batch['y']))
  loss, accuracy = keras_model.evaluate(features_and_labels, verbose=0)
  return collections.OrderedDict(loss=float(loss), accuracy=float(accuracy))
