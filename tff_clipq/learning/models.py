"""Keras models for the experiments, and their wrapping as TFF models.

Three classifiers, all producing logits (losses use `from_logits=True`):

* `cnn`: the paper's MNIST CNN: Conv2D 3x3x16 -> MaxPool 2x2 -> Conv2D 3x3x16 -> MaxPool 2x2 ->
  Flatten -> Dense 100 -> Dense `num_classes`, tanh activations on the hidden layers. The
  convolutions use 'valid' padding (the usual unpadded 3x3 convolution) whenever the input is
  large enough for it, i.e. at least 10x10, and 'same' padding otherwise, so that the same
  architecture runs on the 8x8 scikit-learn digits: with 'valid' padding an 8x8 image shrinks to
  an empty feature map (8 -> 6 -> 3 -> 1 -> 0). On 28x28 MNIST the model has 43,590 parameters;
  on 8x8 digits it has 9,990.
* `mlp`: Flatten -> Dense 200 relu -> Dense 200 relu -> Dense `num_classes`.
* `logistic`: Flatten -> Dense `num_classes` (multinomial logistic regression).

The models contain no BatchNormalization: TFF's federated averaging averages only the trainable
variables, so the moving statistics of batch normalization would never be aggregated.

Layer names ('conv1', 'conv2', 'dense1', 'dense2', 'logits') are stable, because per-tensor bit
widths are given as lists in `model.trainable_variables` order. That order is one tensor after
another, layer by layer in model order, kernel before bias within a layer;
`trainable_tensor_names` states it for a given model and `bits_per_tensor` expands per-layer bit
widths (the paper's "4-2-2-4") to it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.learning import qat as qat_lib

MODEL_NAMES = ('cnn', 'mlp', 'logistic')
MNIST_INPUT_SHAPE = (28, 28, 1)

_CNN_FILTERS = 16
_CNN_HIDDEN_UNITS = 100
_MLP_HIDDEN_UNITS = 200


def _validate_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(
    isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in shape
  ):
    raise ValueError(
      '`input_shape` must be three positive integers (height, width, channels). '
      f'Found {input_shape!r}.'
    )
  return shape


class _SeededInitializers:
  """Hands out kernel initializers with distinct seeds derived from one model seed.

  Each layer needs its own seed: a seeded Keras initializer returns the same values on every
  call, so sharing one would give equal-shaped layers identical weights.
  """

  def __init__(self, seed: Optional[int]):
    self._seed = seed
    self._count = 0

  def glorot_uniform(self) -> tf.keras.initializers.Initializer:
    if self._seed is None:
      return tf.keras.initializers.GlorotUniform()
    self._count += 1
    return tf.keras.initializers.GlorotUniform(seed=self._seed * 1000 + self._count)


def cnn_padding(input_shape: Sequence[int]) -> str:
  """'valid' if both conv/pool stages leave a non-empty map for `input_shape`, else 'same'."""
  height, width, _ = _validate_input_shape(input_shape)

  def valid_output_size(size: int) -> int:
    for _ in range(2):
      size = (size - 2) // 2
    return size

  return 'valid' if min(valid_output_size(height), valid_output_size(width)) >= 1 else 'same'


def _cnn_layers(
  input_shape: tuple[int, int, int], num_classes: int, initializers: _SeededInitializers
) -> list[tf.keras.layers.Layer]:
  padding = cnn_padding(input_shape)

  def conv(name: str) -> tf.keras.layers.Layer:
    return tf.keras.layers.Conv2D(
      _CNN_FILTERS,
      kernel_size=3,
      padding=padding,
      activation='tanh',
      kernel_initializer=initializers.glorot_uniform(),
      name=name,
    )

  return [
    conv('conv1'),
    tf.keras.layers.MaxPool2D(pool_size=2, name='pool1'),
    conv('conv2'),
    tf.keras.layers.MaxPool2D(pool_size=2, name='pool2'),
    tf.keras.layers.Flatten(name='flatten'),
    tf.keras.layers.Dense(
      _CNN_HIDDEN_UNITS,
      activation='tanh',
      kernel_initializer=initializers.glorot_uniform(),
      name='dense1',
    ),
    tf.keras.layers.Dense(
      num_classes, kernel_initializer=initializers.glorot_uniform(), name='logits'
    ),
  ]


def _mlp_layers(num_classes: int, initializers: _SeededInitializers) -> list[tf.keras.layers.Layer]:
  return [
    tf.keras.layers.Flatten(name='flatten'),
    tf.keras.layers.Dense(
      _MLP_HIDDEN_UNITS,
      activation='relu',
      kernel_initializer=initializers.glorot_uniform(),
      name='dense1',
    ),
    tf.keras.layers.Dense(
      _MLP_HIDDEN_UNITS,
      activation='relu',
      kernel_initializer=initializers.glorot_uniform(),
      name='dense2',
    ),
    tf.keras.layers.Dense(
      num_classes, kernel_initializer=initializers.glorot_uniform(), name='logits'
    ),
  ]


def _logistic_layers(
  num_classes: int, initializers: _SeededInitializers
) -> list[tf.keras.layers.Layer]:
  return [
    tf.keras.layers.Flatten(name='flatten'),
    tf.keras.layers.Dense(
      num_classes, kernel_initializer=initializers.glorot_uniform(), name='logits'
    ),
  ]


def create_keras_model(
  name: str,
  input_shape: Sequence[int] = MNIST_INPUT_SHAPE,
  num_classes: int = 10,
  seed: Optional[int] = None,
) -> tf.keras.Model:
  """Builds the uncompiled Keras classifier `name` ('cnn', 'mlp' or 'logistic'), outputting logits.

  Args:
    name: one of `MODEL_NAMES`.
    input_shape: (height, width, channels) of one example.
    num_classes: number of output logits.
    seed: non-negative integer making the initial weights deterministic (biases start at zero);
      None draws them at random.
  """
  if name not in MODEL_NAMES:
    raise ValueError(f'`model` must be one of {MODEL_NAMES}. Found {name!r}.')
  input_shape = _validate_input_shape(input_shape)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f'`num_classes` must be an integer >= 2. Found {num_classes!r}.')
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
    raise ValueError(f'`seed` must be None or a non-negative integer. Found {seed!r}.')
  initializers = _SeededInitializers(seed)
  if name == 'cnn':
    layers = _cnn_layers(input_shape, num_classes, initializers)
  elif name == 'mlp':
    layers = _mlp_layers(num_classes, initializers)
  else:
    layers = _logistic_layers(num_classes, initializers)
  return tf.keras.Sequential([tf.keras.Input(shape=input_shape, name='x'), *layers], name=name)


def model_input_spec(
  input_shape: Sequence[int] = MNIST_INPUT_SHAPE,
) -> collections.OrderedDict[str, tf.TensorSpec]:
  """Element spec of batched client data: x float32 [batch, *input_shape], y int32 [batch]."""
  input_shape = _validate_input_shape(input_shape)
  return collections.OrderedDict(
    x=tf.TensorSpec([None, *input_shape], tf.float32),
    y=tf.TensorSpec([None], tf.int32),
  )


def _weight_short_name(variable: tf.Variable) -> str:
  """'kernel' for a variable named e.g. 'conv1/kernel:0'."""
  return variable.name.split(':')[0].split('/')[-1]


def trainable_tensor_names(keras_model: tf.keras.Model) -> tuple[str, ...]:
  """'<layer>/<weight>' for each of `keras_model.trainable_variables`, in that order.

  This is the order in which TFF's `model.trainable_variables` (and so each model delta an
  aggregator receives) lists the tensors, e.g. for the CNN: ('conv1/kernel', 'conv1/bias',
  'conv2/kernel', 'conv2/bias', 'dense1/kernel', 'dense1/bias', 'logits/kernel', 'logits/bias').
  Quantization wrappers are looked through, so a QAT model gives the same names as the plain one.
  """
  return tuple(
    f'{layer.name}/{_weight_short_name(variable)}'
    for layer, variables in qat_lib.trainable_variables_by_layer(keras_model)
    for variable in variables
  )


def bits_per_tensor(keras_model: tf.keras.Model, bits_per_layer: Sequence[int]) -> tuple[int, ...]:
  """Expands one bit width per weighted layer (e.g. the paper's 4-2-2-4) to one per tensor.

  Every trainable tensor of a layer (kernel and bias) gets that layer's bit width; the result is
  in `keras_model.trainable_variables` order, as aggregators and `QatConfig` expect it.

  Args:
    keras_model: the model (plain or wrapped for QAT) whose layers the widths refer to.
    bits_per_layer: one bit width per layer with trainable weights, in layer order.

  Raises:
    ValueError: if `bits_per_layer` does not have one entry per such layer.
  """
  grouped = qat_lib.trainable_variables_by_layer(keras_model)
  bits_per_layer = tuple(bits_per_layer)
  if len(bits_per_layer) != len(grouped):
    raise ValueError(
      f'`bits_per_layer` must have one entry per layer with trainable weights; model '
      f'{keras_model.name!r} has {len(grouped)} ({[layer.name for layer, _ in grouped]}). '
      f'Found {len(bits_per_layer)}: {bits_per_layer!r}.'
    )
  return tuple(bits for bits, (_, variables) in zip(bits_per_layer, grouped) for _ in variables)


def build_tff_model_fn(
  model_name: str,
  input_shape: Sequence[int] = MNIST_INPUT_SHAPE,
  num_classes: int = 10,
  seed: Optional[int] = None,
  qat: Optional[qat_lib.QatConfig] = None,
) -> Callable[[], tff.learning.models.VariableModel]:
  """A no-argument function building a fresh TFF model for `model_name` on every call.

  TFF calls `model_fn` inside its own graphs, so each call constructs a new Keras model (and,
  with `qat`, wraps it for quantization-aware training with `tff_clipq.learning.qat.apply_qat`).
  The loss is sparse categorical cross-entropy on logits; accuracy is reported as a metric.
  Arguments (and `qat` against the model) are checked once, here, so that a bad configuration
  fails at this call rather than inside TFF's tracing.

  Args:
    model_name: one of `MODEL_NAMES`.
    input_shape: (height, width, channels) of one example.
    num_classes: number of output logits.
    seed: non-negative integer making the initial weights deterministic (the same for every
      model built); None draws them at random.
    qat: optional `QatConfig`; when given, every model is wrapped for quantization-aware
      training.
  """
  input_spec = model_input_spec(input_shape)
  template = create_keras_model(model_name, input_shape, num_classes, seed)
  if qat is not None:
    qat_lib.apply_qat(template, qat)

  def model_fn() -> tff.learning.models.VariableModel:
    keras_model = create_keras_model(model_name, input_shape, num_classes, seed)
    if qat is not None:
      keras_model = qat_lib.apply_qat(keras_model, qat)
    return tff.learning.models.from_keras_model(
      keras_model,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      input_spec=input_spec,
      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
    )

  return model_fn
