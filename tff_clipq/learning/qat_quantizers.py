"""The weight quantizer of QAT: a tfmot `Quantizer` and `QuantizeConfig` for clipped weights.

`ClippedUniformWeightQuantizer` fake-quantizes one weight tensor in the forward pass with a
straight-through gradient (`straight_through_fake_quantize`), caching its clipping threshold
between refreshes; `ClippedWeightQuantizeConfig` applies it to the kernel and bias of a Conv2D or
Dense layer. `qat.py` wires them into a model (its module docstring says how and why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tff_clipq import quantization
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import quantizer as quantizer_lib

ClippingMethod = Union[str, float]


def validate_clipping(clipping: Any) -> ClippingMethod:
  """Returns `clipping` if it is a known method or a positive number, else raises ValueError."""
  return encoding_plan.validate_clipping(clipping)


def validate_refresh_steps(steps: Any) -> int:
  """Returns `steps` if it is a non-negative int, else raises ValueError."""
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ValueError(f'`threshold_refresh_steps` must be a non-negative integer. Found {steps!r}.')
  return steps


def straight_through_fake_quantize(
  weights: tf.Tensor,
  bits: int,
  clipping: ClippingMethod = 'octav',
  rounding: str = 'nearest',
  threshold: Optional[tf.Tensor] = None,
) -> tf.Tensor:
  """Clipped, quantized `weights` in the forward pass; identity in the backward pass.

  The clipping threshold is `threshold` if given, else the one the upload quantizer uses with
  `rounding`, computed from `weights`; the forward pass itself rounds to the nearest level, so
  training stays deterministic (and a resumed run reproduces an uninterrupted one) even when
  uploads round stochastically.

  Not converted by AutoGraph (Keras converts layer calls): the quantization code has no
  tensor-dependent Python control flow, and converting it slows every model construction.

  Args:
    weights: floating-point weight tensor.
    bits: bits per weight, 1..16.
    clipping: threshold method, as in `tff_clipq.quantization.clipping_threshold`; unused when
      `threshold` is given.
    rounding: the upload quantizer's rounding, 'nearest' or 'stochastic' (selects the threshold
      only; the forward pass rounds to nearest).
    threshold: optional scalar clipping threshold to use instead of computing one.
  """
  constant_weights = tf.stop_gradient(weights)
  if threshold is None:
    threshold = quantization.clipping_threshold(constant_weights, bits, clipping, rounding)
  quantized = _nearest_levels(constant_weights, bits, threshold)
  return weights + tf.stop_gradient(quantized - weights)


def _nearest_levels(weights: tf.Tensor, bits: int, threshold: tf.Tensor) -> tf.Tensor:
  """`fake_quantize(weights, bits, threshold, 'nearest')` in 7 elementwise ops instead of ~20.

  It runs at every training step, so it skips what the upload quantizer needs and training
  does not: NaN handling, integer codes, and building each level from the nearer end of the range
  (exact +-s; here levels may differ from the upload's by float rounding, ~1e-7 relative).
  """
  dtype = quantizer_lib.compute_dtype(weights.dtype)
  threshold = tf.cast(threshold, dtype)
  max_code = float(quantizer_lib.num_levels(bits) - 1)
  step = quantizer_lib.quantization_step(threshold, bits)
  codes_per_unit = tf.math.divide_no_nan(tf.constant(0.5 * max_code, dtype), threshold)
  clipped = tf.clip_by_value(tf.cast(weights, dtype), -threshold, threshold)
  codes = tf.floor(clipped * codes_per_unit + (0.5 * max_code + 0.5))
  return tf.cast(codes * step - threshold, weights.dtype)


class ClippedUniformWeightQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
  """tfmot `Quantizer` applying `straight_through_fake_quantize`.

  With `threshold_refresh_steps=1` it recomputes the threshold at every call and creates no
  variables. Otherwise `build` adds two non-trainable variables to the layer, the cached
  threshold and a pass counter, and a call recomputes (and caches) the threshold only when the
  counter is 0 (`threshold_refresh_steps=0`) or a multiple of `threshold_refresh_steps`.

  Args:
    bits: bits per weight, 1..16.
    clipping: threshold method, as in `tff_clipq.quantization.clipping_threshold`.
    rounding: the upload quantizer's rounding, 'nearest' or 'stochastic'.
    threshold_refresh_steps: >= 0; 1 recomputes at every pass, N > 1 every N passes, 0 only
      while the pass counter is 0.
  """

  def __init__(
    self,
    bits: int,
    clipping: ClippingMethod = 'octav',
    rounding: str = 'nearest',
    threshold_refresh_steps: int = 0,
  ):
    self.bits = quantizer_lib.validate_bits(bits)
    self.clipping = validate_clipping(clipping)
    self.rounding = quantizer_lib.validate_rounding(rounding)
    self.threshold_refresh_steps = validate_refresh_steps(threshold_refresh_steps)

  def build(self, tensor_shape, name, layer) -> dict[str, tf.Variable]:
    """Creates the cached threshold and pass counter (none if `threshold_refresh_steps` is 1).

    Args:
      tensor_shape: shape of the quantized weight; unused (one threshold per tensor).
      name: the weight's name, a prefix of the created variables' names.
      layer: the layer that owns the created variables.

    Returns:
      {'threshold': float32 scalar, 'passes': int32 scalar} variables, or {}.
    """
    del tensor_shape  # One threshold per tensor.
    if self.threshold_refresh_steps == 1:
      return {}
    return {
      'threshold': layer.add_weight(
        f'{name}_clip_threshold',
        shape=(),
        dtype=tf.float32,
        initializer=tf.keras.initializers.Zeros(),
        trainable=False,
      ),
      'passes': layer.add_weight(
        f'{name}_threshold_passes',
        shape=(),
        dtype=tf.int32,
        initializer=tf.keras.initializers.Zeros(),
        trainable=False,
      ),
    }

  @tf.autograph.experimental.do_not_convert
  def _cached_threshold(self, inputs: tf.Tensor, weights: dict[str, tf.Variable]) -> tf.Tensor:
    """The cached threshold, recomputed first when this pass is due for a refresh."""
    passes = weights['passes']
    if self.threshold_refresh_steps == 0:
      due = tf.equal(passes, 0)
    else:
      due = tf.equal(tf.math.floormod(passes, self.threshold_refresh_steps), 0)

    def refresh() -> tf.Tensor:
      fresh = quantization.clipping_threshold(
        tf.stop_gradient(inputs), self.bits, self.clipping, self.rounding
      )
      return weights['threshold'].assign(tf.cast(fresh, tf.float32))

    threshold = tf.cond(due, refresh, weights['threshold'].read_value)
    with tf.control_dependencies([threshold]):
      passes.assign_add(1)
    return tf.cast(threshold, quantizer_lib.compute_dtype(inputs.dtype))

  def __call__(self, inputs, training, weights, **kwargs) -> tf.Tensor:
    del training, kwargs  # Same quantization in training and inference.
    threshold = self._cached_threshold(inputs, weights) if weights else None
    return straight_through_fake_quantize(
      inputs, self.bits, self.clipping, self.rounding, threshold
    )

  def get_config(self) -> dict[str, Any]:
    return {
      'bits': self.bits,
      'clipping': self.clipping,
      'rounding': self.rounding,
      'threshold_refresh_steps': self.threshold_refresh_steps,
    }


class ClippedWeightQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
  """Quantizes the named weights of a Conv2D/Dense layer, each at its own bit width.

  `weight_names` are layer attributes ('kernel', 'bias'); weights not named stay float.
  Activations and outputs are not quantized.

  Args:
    weight_names: names of the layer attributes to quantize, e.g. ('kernel', 'bias').
    bits: bits per weight, one entry per name in `weight_names`.
    clipping: threshold method, as in `tff_clipq.quantization.clipping_threshold`.
    rounding: the upload quantizer's rounding, 'nearest' or 'stochastic'.
    threshold_refresh_steps: as in `ClippedUniformWeightQuantizer`.
  """

  def __init__(
    self,
    weight_names: Sequence[str],
    bits: Sequence[int],
    clipping: ClippingMethod = 'octav',
    rounding: str = 'nearest',
    threshold_refresh_steps: int = 0,
  ):
    self.weight_names = tuple(weight_names)
    self.bits = tuple(bits)
    if len(self.weight_names) != len(self.bits):
      raise ValueError(
        f'`weight_names` and `bits` must have equal lengths. Found {self.weight_names!r} and '
        f'{self.bits!r}.'
      )
    self.clipping = clipping
    self.rounding = rounding
    self.threshold_refresh_steps = threshold_refresh_steps

  def get_weights_and_quantizers(self, layer):
    return [
      (
        getattr(layer, name),
        ClippedUniformWeightQuantizer(
          bits, self.clipping, self.rounding, self.threshold_refresh_steps
        ),
      )
      for name, bits in zip(self.weight_names, self.bits)
    ]

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_weights(self, layer, quantize_weights):
    """Sets the named attributes of `layer` to their quantized weights.

    Args:
      layer: the wrapped Conv2D or Dense layer.
      quantize_weights: the quantized weights, in `weight_names` order.
    """
    for name, quantized in zip(self.weight_names, quantize_weights):
      setattr(layer, name, quantized)

  def set_quantize_activations(self, layer, quantize_activations):
    """Does nothing: activations are not quantized.

    Args:
      layer: the wrapped layer; unused.
      quantize_activations: unused (always empty).
    """
    pass

  def get_output_quantizers(self, layer):
    return []

  def get_config(self) -> dict[str, Any]:
    return {
      'weight_names': list(self.weight_names),
      'bits': list(self.bits),
      'clipping': self.clipping,
      'rounding': self.rounding,
      'threshold_refresh_steps': self.threshold_refresh_steps,
    }
