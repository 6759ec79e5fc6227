"""Quantization-aware training (QAT): forward passes through clipped, quantized weights.

In the paper's QAT, clients train a model whose forward pass uses each weight tensor `w`
clipped at its MSE-optimal threshold and quantized to the run's bit width,

    w_q = fake_quantize(w, bits, clipping_threshold(stop_gradient(w), bits)),

while the gradient reaches the float weights unchanged (straight-through estimator):
`w + stop_gradient(w_q - w)` equals `w_q` in value and has derivative 1 with respect to `w`.
The threshold is treated as a constant by the gradient. How often it is recomputed from the
current weights is `QatConfig.threshold_refresh_steps`: at every forward pass (1, OCTAV's
per-iteration recomputation), every N passes, or (0, the default) once, at the first forward pass
after the quantizer's pass counter was reset; TFF resets it at the start of every client round,
since clients load the model, non-trainable variables included, from the server state, where the
counter stays 0. Local training moves the weights little within one client round, while the
full MSE-optimal search costs several plain training steps (see docs/results.md, section 2).
Weights are quantized in inference as well as in training, so evaluating a QAT model measures the
quantized model; the plain model with the same weights measures the float one. Activations are
not quantized.

This is built on tensorflow-model-optimization's QAT machinery: a `Quantizer`
(`ClippedUniformWeightQuantizer`), a `QuantizeConfig` (`ClippedWeightQuantizeConfig`) for the
kernels and biases of Conv2D/Dense layers, and `quantize_annotate_layer` + `quantize_apply`.
`quantize_apply` is given its own `QuantizeScheme` (`WeightOnlyQuantizeScheme`): on the CNN, tfmot's
default 8-bit scheme would also insert a `QuantizeLayer` that quantizes the input images to 8 bits
(with min/max variables), and wrap the unannotated layers that feed annotated ones (pool1,
flatten) in output-only quantize wrappers; the paper quantizes weights only.

Variables. TFF's federated averaging aggregates `model.trainable_variables`, and per-tensor bit
widths are listed in that order, so a QAT model must expose exactly the trainable variables of the
plain model. tfmot's `QuantizeWrapperV2` keeps the wrapped layer's trainable weights in their
original order, and `ClippedUniformWeightQuantizer` creates no variables, so the trainable
variables of the QAT model match the plain model's in number, shapes and order (tested). The
additions are non-trainable: one int32 scalar `optimizer_step` per wrapped layer (tfmot's wrapper
creates it unconditionally; nothing here reads it) and, unless thresholds are refreshed at every
pass, per quantized tensor the cached threshold (float32 scalar `<weight>_clip_threshold`) and the
pass counter (int32 scalar `<weight>_threshold_passes`). TFF keeps non-trainable variables in the
server's model weights and does not average them; clients start every round from the server's
values (counter 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Union

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tff_clipq.learning import qat_quantizers
from tff_clipq.quantization import quantizer as quantizer_lib

ClippingMethod = qat_quantizers.ClippingMethod

QUANTIZABLE_LAYER_TYPES = (tf.keras.layers.Conv2D, tf.keras.layers.Dense)
_QUANTIZABLE_WEIGHT_NAMES = ('kernel', 'bias')


@dataclasses.dataclass(frozen=True)
class QatConfig:
  """How a client's forward pass quantizes the model's weights.

  Attributes:
    bits: bits per weight; one int for every tensor, or a sequence with one entry per trainable
      tensor in `model.trainable_variables` order (kernel and bias of each layer, see
      `tff_clipq.learning.models.trainable_tensor_names`), the same list an aggregator gets.
      `tff_clipq.learning.models.bits_per_tensor` expands per-layer widths such as 4-2-2-4.
      Entries of tensors that stay float (see `min_size_to_quantize`) are ignored.
    clipping: threshold method, as in `tff_clipq.quantization.clipping_threshold`: 'octav'
      (MSE-optimal), 'octav_paper', 'max_abs' (no clipping) or a fixed positive threshold.
    rounding: the upload quantizer's rounding, 'nearest' or 'stochastic': it selects the clipping
      threshold (stochastic rounding's is smaller); the forward pass rounds to nearest.
    min_size_to_quantize: tensors with fewer elements stay float, matching the aggregator's
      size threshold.
    threshold_refresh_steps: recompute each tensor's threshold at every forward pass (1), every
      N passes (N > 1), or only at the first pass after the pass counter is reset (0: once per
      client round under TFF; once for the model's lifetime in a plain Keras loop that never
      resets it).
  """

  bits: Union[int, tuple[int, ...]]
  clipping: ClippingMethod = 'octav'
  rounding: str = 'nearest'
  min_size_to_quantize: int = 0
  threshold_refresh_steps: int = 0

  def __post_init__(self):
    if isinstance(self.bits, Sequence) and not isinstance(self.bits, str):
      if not self.bits:
        raise ValueError('`bits` must be an int or a non-empty sequence of ints. Found ().')
      object.__setattr__(self, 'bits', tuple(self.bits))
      for bits in self.bits:
        quantizer_lib.validate_bits(bits)
    else:
      quantizer_lib.validate_bits(self.bits)
    qat_quantizers.validate_clipping(self.clipping)
    quantizer_lib.validate_rounding(self.rounding)
    size = self.min_size_to_quantize
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
      raise ValueError(f'`min_size_to_quantize` must be a non-negative integer. Found {size!r}.')
    qat_quantizers.validate_refresh_steps(self.threshold_refresh_steps)

  def bits_per_tensor(self, num_tensors: int) -> tuple[int, ...]:
    """`bits` as one entry per tensor; raises ValueError if a sequence has the wrong length."""
    if isinstance(self.bits, int):
      return (self.bits,) * num_tensors
    if len(self.bits) != num_tensors:
      raise ValueError(
        f'`bits` must have one entry per trainable tensor of the model: expected {num_tensors}, '
        f'found {len(self.bits)}: {self.bits!r}.'
      )
    return self.bits


@tf.autograph.experimental.do_not_convert
class _IdentityLayoutTransform(tfmot.quantization.keras.QuantizeLayoutTransform):
  """Leaves the model's layout alone (no layer fusion, no inserted input quantizer)."""

  def apply(self, model, layer_quantize_map):
    return model, layer_quantize_map


class _EmptyQuantizeRegistry(tfmot.quantization.keras.QuantizeRegistry):
  """Supplies no default configs, so unannotated layers get no output quantization."""

  def get_quantize_config(self, layer):
    return None

  def supports(self, layer) -> bool:
    return False


class WeightOnlyQuantizeScheme(tfmot.quantization.keras.QuantizeScheme):
  """`quantize_apply` scheme that wraps only the annotated layers, with their own configs."""

  def get_layout_transformer(self):
    return _IdentityLayoutTransform()

  def get_quantize_registry(self):
    return _EmptyQuantizeRegistry()


_CUSTOM_OBJECTS = {
  'ClippedUniformWeightQuantizer': qat_quantizers.ClippedUniformWeightQuantizer,
  'ClippedWeightQuantizeConfig': qat_quantizers.ClippedWeightQuantizeConfig,
}


def trainable_variables_by_layer(
  keras_model: tf.keras.Model,
) -> list[tuple[tf.keras.layers.Layer, list[tf.Variable]]]:
  """(layer, its trainable variables) for each layer that has some, in model order.

  A wrapper layer (e.g. tfmot's `QuantizeWrapperV2`) is reported as the layer it wraps. Raises
  ValueError unless concatenating the lists gives `keras_model.trainable_variables` exactly, since
  per-tensor bit widths are assigned in that order.
  """
  grouped = [
    (
      layer.layer if isinstance(layer, tf.keras.layers.Wrapper) else layer,
      list(layer.trainable_variables),
    )
    for layer in keras_model.layers
    if layer.trainable_variables
  ]
  flattened = [variable.ref() for _, variables in grouped for variable in variables]
  if flattened != [variable.ref() for variable in keras_model.trainable_variables]:
    raise ValueError(
      f'The trainable variables of model {keras_model.name!r} are not ordered layer by layer, '
      'so per-tensor bit widths cannot be assigned to them.'
    )
  return grouped


def _weight_attribute(layer: tf.keras.layers.Layer, variable: tf.Variable) -> str:
  for name in _QUANTIZABLE_WEIGHT_NAMES:
    if getattr(layer, name, None) is variable:
      return name
  raise ValueError(
    f'Layer {layer.name!r} has a trainable variable {variable.name!r} that is '
    f'none of {_QUANTIZABLE_WEIGHT_NAMES}.'
  )


def _quantize_configs(
  keras_model: tf.keras.Model, config: QatConfig
) -> dict[str, qat_quantizers.ClippedWeightQuantizeConfig]:
  """Quantize config per layer name, for the layers with at least one tensor to quantize."""
  grouped = trainable_variables_by_layer(keras_model)
  bits = iter(config.bits_per_tensor(sum(len(variables) for _, variables in grouped)))
  configs = {}
  for layer, variables in grouped:
    if not isinstance(layer, QUANTIZABLE_LAYER_TYPES):
      raise ValueError(
        f'QAT supports trainable weights only in {[t.__name__ for t in QUANTIZABLE_LAYER_TYPES]}'
        f' layers. Found layer {layer.name!r} of type {type(layer).__name__}.'
      )
    names, widths = [], []
    for variable in variables:
      width = next(bits)
      if variable.shape.num_elements() >= config.min_size_to_quantize:
        names.append(_weight_attribute(layer, variable))
        widths.append(width)
    if names:
      configs[layer.name] = qat_quantizers.ClippedWeightQuantizeConfig(
        names, widths, config.clipping, config.rounding, config.threshold_refresh_steps
      )
  return configs


@contextlib.contextmanager
def _constant_learning_phase() -> Iterator[None]:
  """Fixes Keras' learning phase to a Python constant while the QAT model is constructed.

  tfmot's wrapper picks the training or inference quantizer with `smart_cond` on the learning
  phase. Under TFF, models are built in graph mode, where the learning phase is a placeholder, so
  every wrapped weight would get a `tf.cond` holding two traced copies of the threshold search
  (plus the intermediates cond_v2 keeps for gradients): about 6x the ops and several seconds more
  per model construction. `ClippedUniformWeightQuantizer` ignores the flag, so a constant is
  exact. Keras calls made later with an explicit `training=` are not affected.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message='.*learning_phase_scope` is deprecated')
    with tf.keras.backend.learning_phase_scope(0):
      yield


def apply_qat(keras_model: tf.keras.Model, config: QatConfig) -> tf.keras.Model:
  """A copy of `keras_model` whose forward pass quantizes weights as `config` says.

  The copy starts from `keras_model`'s current weights but owns its variables; its trainable
  variables have the same shapes and order as `keras_model`'s. `keras_model` must be a built,
  uncompiled Sequential or functional model whose trainable weights are kernels and biases of
  Conv2D and Dense layers.

  Args:
    keras_model: the model to copy; it is not modified.
    config: the `QatConfig` saying which tensors to quantize and how.

  Raises:
    TypeError: if `config` is not a `QatConfig`.
    ValueError: if the model is already wrapped, or its weights do not fit `config` or QAT.
  """
  if not isinstance(config, QatConfig):
    raise TypeError(f'`config` must be a QatConfig. Found {type(config).__name__}.')
  wrapper_type = tfmot.quantization.keras.QuantizeWrapper
  if any(isinstance(layer, wrapper_type) for layer in keras_model.layers):
    raise ValueError(f'Model {keras_model.name!r} is already wrapped for quantization.')
  configs = _quantize_configs(keras_model, config)
  if not configs:  # Every tensor stays float; quantize_apply refuses a model with nothing to do.
    model_copy = tf.keras.models.clone_model(keras_model)
    model_copy.set_weights(keras_model.get_weights())
    return model_copy

  def annotate(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
    if layer.name not in configs:
      return layer
    return tfmot.quantization.keras.quantize_annotate_layer(layer, configs[layer.name])

  with _constant_learning_phase(), tfmot.quantization.keras.quantize_scope(_CUSTOM_OBJECTS):
    annotated = tf.keras.models.clone_model(keras_model, clone_function=annotate)
    return tfmot.quantization.keras.quantize_apply(annotated, WeightOnlyQuantizeScheme())
