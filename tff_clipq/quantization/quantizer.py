"""Symmetric clipped uniform quantizer: clip to [-s, s], 2^B levels, integer codes.

The quantizer has `2**bits` levels `-s + k * step` for `k = 0 .. 2**bits - 1`, with
`step = 2 s / (2**bits - 1)`: the outermost levels sit exactly at +-s. A value is first clipped
to [-s, s] and then rounded to a neighbouring level, either to the nearest one (deterministic)
or stochastically with probabilities that make the result unbiased inside [-s, s]:
`E[dequantize(quantize(x))] = clip(x, -s, s)`, to within 2^-17 of a step (the rounding noise has
16 random bits; see `_uniform_noise`).

The level set is symmetric around zero, so the quantization error of `x` equals that of `|x|`;
the threshold search in `thresholds.py` relies on this.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence, Union

import numpy as np
import tensorflow as tf

ROUNDING_MODES = ('nearest', 'stochastic')
MIN_BITS = 1
MAX_BITS = 16

SeedLike = Union[tf.Tensor, Sequence[int], int, None]


def validate_bits(bits: int) -> int:
  """Returns `bits` as an int, or raises ValueError if it is not an integer in [1, 16]."""
  if (
    isinstance(bits, bool)
    or not isinstance(bits, numbers.Integral)
    or not MIN_BITS <= bits <= MAX_BITS
  ):
    raise ValueError(f'`bits` must be an integer in [{MIN_BITS}, {MAX_BITS}]. Found {bits!r}.')
  return int(bits)


def validate_rounding(rounding: str) -> str:
  """Returns `rounding`, or raises ValueError if it is not a known rounding mode."""
  if rounding not in ROUNDING_MODES:
    raise ValueError(f'`rounding` must be one of {ROUNDING_MODES}. Found {rounding!r}.')
  return rounding


def validate_float_tensor(x: tf.Tensor, name: str = 'x') -> tf.Tensor:
  """Converts `x` to a tensor and checks it has a floating dtype (raises TypeError otherwise).

  Args:
    x: tensor, array or Python value to convert.
    name: the argument's name, used in the error message.

  Returns:
    `x` as a floating-point tensor.
  """
  x = tf.convert_to_tensor(x)
  if not x.dtype.is_floating:
    raise TypeError(f'`{name}` must be a floating-point tensor. Found dtype {x.dtype.name}.')
  return x


def compute_dtype(dtype: tf.DType) -> tf.DType:
  """Float64 inputs are processed in float64; every other float dtype in float32."""
  return tf.float64 if dtype == tf.float64 else tf.float32


def as_compute_tensor(value: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """`value` (tensor, array or Python number) as a `dtype` tensor.

  Python floats convert straight to `dtype` (`tf.cast(1.3, tf.float64)` rounds to float32 first).

  Args:
    value: tensor, array or Python number.
    dtype: the dtype of the result.
  """
  return tf.cast(tf.convert_to_tensor(value, dtype_hint=dtype), dtype)


def num_levels(bits: int) -> int:
  return 2**bits


def quantization_step(threshold: tf.Tensor, bits: int) -> tf.Tensor:
  """Distance between adjacent levels: 2 s / (2^B - 1).

  Args:
    threshold: clipping threshold s (a tensor or number; scalar or per-channel vector).
    bits: bits per code B.
  """
  return 2.0 * threshold / float(num_levels(bits) - 1)


def square_sum(t: tf.Tensor) -> tf.Tensor:
  """Sum of squares of all entries of `t`, in one operation (`tf.nn.l2_loss` is half of it)."""
  return 2.0 * tf.nn.l2_loss(t)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """Integer codes of a quantized tensor, with what is needed to dequantize them.

  Attributes:
    codes: int32 tensor of the original shape, values in [0, 2**bits - 1].
    threshold: the clipping threshold s (scalar, or a vector over the last axis for
      per-channel quantization), in the compute dtype.
    bits: bits per code.
    dtype: dtype of the original tensor; `dequantize` returns this dtype.
  """

  codes: tf.Tensor
  threshold: tf.Tensor
  bits: int
  dtype: tf.DType


def validate_threshold(threshold: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
  """Checks that `threshold` is a scalar, or a vector matching the last axis of `x`, and (when
  its value is known, i.e. eagerly) finite and >= 0.

  Args:
    threshold: clipping threshold: a scalar (per tensor) or a vector of length `x.shape[-1]`
      (per channel).
    x: floating-point tensor the threshold applies to; its dtype sets the compute dtype.

  Returns:
    `threshold` as a tensor in the compute dtype of `x`.

  Raises:
    ValueError: if the shape does not fit, or (eagerly) a value is not finite or is negative.
  """
  threshold = as_compute_tensor(threshold, compute_dtype(x.dtype))
  per_channel = (
    threshold.shape.rank == 1
    and x.shape.rank is not None
    and x.shape.rank >= 1
    and threshold.shape[0] is not None
    and threshold.shape[0] == x.shape[-1]
  )
  if threshold.shape.rank != 0 and not per_channel:
    raise ValueError(
      '`threshold` must be a scalar (per tensor) or a vector of length x.shape[-1] '
      f'(per channel). Found threshold shape {threshold.shape} for x shape {x.shape}.'
    )
  if tf.executing_eagerly():
    values = threshold.numpy()
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
      raise ValueError(f'`threshold` must be finite and >= 0. Found {values}.')
  return threshold


# Random bits per entry of the stochastic-rounding noise (see `_uniform_noise`).
NOISE_BITS = 16


def _uniform_noise(shape: tf.Tensor, dtype: tf.DType, seed: SeedLike) -> tf.Tensor:
  """Noise (k + 1/2) / 2^16, k uniform in [0, 2^16), for stochastic rounding.

  Each 32-bit output of TensorFlow's stateless Philox generator gives two entries, halving the
  generator's cost, which was the largest single operation of encoding (0.2 of 1.4 ms for the
  CNN's update on one thread, more on two). The noise has mean exactly 1/2, and rounding up has
  probability round(2^16 f) / 2^16 for fractional position f, so stochastic rounding stays unbiased
  to within 2^-17 of a step (float32 positions of 8+ bit codes are no finer than that anyway).
  Without a seed, a fresh random one is drawn (not reproducible); an int seed `k` means [0, k].
  """
  if seed is None:
    seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
  seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
  if seed.shape == []:  # A plain int, as users type it.
    seed = tf.stack([tf.constant(0, tf.int64), seed])
  if seed.shape != [2]:
    raise ValueError(
      f'`seed` must be an int or a shape-[2] stateless RNG seed. Found shape {seed.shape}.'
    )
  size = tf.reduce_prod(shape)
  words = tf.random.stateless_uniform(
    [(size + 1) // 2], seed=seed, minval=None, maxval=None, dtype=tf.uint32
  )
  halves = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size]
  scale = 1.0 / 2.0**NOISE_BITS
  return tf.reshape(tf.cast(halves, dtype) * scale + 0.5 * scale, shape)


def quantize(
  x: tf.Tensor,
  bits: int,
  threshold: tf.Tensor,
  rounding: str = 'nearest',
  seed: SeedLike = None,
) -> QuantizedTensor:
  """Clips `x` to [-threshold, threshold] and maps it to integer codes in [0, 2**bits - 1].

  Args:
    x: floating-point tensor.
    bits: bits per code, 1..16.
    threshold: clipping threshold s >= 0: a scalar, or a vector over the last axis of `x`.
      A zero threshold maps everything to zero.
    rounding: 'nearest' (deterministic) or 'stochastic' (unbiased inside [-s, s]).
    seed: an int or a stateless RNG seed of shape [2], for reproducible stochastic rounding;
      None draws a fresh random seed (not reproducible).

  Returns:
    A `QuantizedTensor`. NaN entries are encoded as the level closest to zero.
  """
  return _quantize(x, bits, threshold, rounding, seed)[0]


def quantize_and_measure(
  x: tf.Tensor,
  bits: int,
  threshold: tf.Tensor,
  rounding: str = 'nearest',
  seed: SeedLike = None,
  all_finite: bool = False,
) -> tuple[QuantizedTensor, tf.Tensor, tf.Tensor]:
  """`quantize`, with this encoding's mean squared error and the fraction of entries clipped.

  Both come from the quantizer's own intermediate values, not from decoding the codes: per entry
  the error is the clipping error (x - clip(x))^2 plus the rounding error ((code - position)
  step)^2, the dequantized level's distance from clip(x) up to float rounding. NaN entries count
  as zeros, as they are encoded. `all_finite=True` promises there are none (the caller has
  checked) and skips their per-entry handling.

  Args:
    x: floating-point tensor.
    bits: bits per code, 1..16.
    threshold: clipping threshold s >= 0: a scalar, or a vector over the last axis of `x`.
    rounding: 'nearest' or 'stochastic'.
    seed: an int or a stateless RNG seed of shape [2] for stochastic rounding; None draws a
      fresh random seed.
    all_finite: True if the caller guarantees `x` has no NaN entries.

  Returns:
    (quantized, error, clipped_fraction): the `QuantizedTensor`, the mean squared error of the
    encoding and the fraction of entries clipped, both scalars in the compute dtype.
  """
  quantized, values, clipped, positions, codes = _quantize(
    x, bits, threshold, rounding, seed, all_finite
  )
  step = quantization_step(quantized.threshold, bits)
  # Per-tensor thresholds: one operation (`square_sum`) where a square and a mean are two.
  square_mean = (
    (lambda t: square_sum(t) / tf.cast(tf.maximum(tf.size(t), 1), t.dtype))
    if step.shape.rank == 0
    else lambda t: tf.reduce_mean(tf.square(t))
  )
  error = square_mean(values - clipped) + square_mean((codes - positions) * step)
  clipped_fraction = tf.reduce_mean(tf.cast(tf.not_equal(values, clipped), values.dtype))
  return quantized, error, clipped_fraction


def _quantize(
  x: tf.Tensor,
  bits: int,
  threshold: tf.Tensor,
  rounding: str,
  seed: SeedLike,
  all_finite: bool = False,
) -> tuple[QuantizedTensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """(quantized, values, clipped values, code positions, codes as floats) in the compute dtype."""
  x = validate_float_tensor(x)
  bits = validate_bits(bits)
  rounding = validate_rounding(rounding)
  dtype = compute_dtype(x.dtype)
  threshold = validate_threshold(threshold, x)
  values = tf.cast(x, dtype)
  if not all_finite:
    values = tf.where(tf.math.is_nan(values), tf.zeros_like(values), values)
  clipped = tf.clip_by_value(values, -threshold, threshold)
  # (clipped / s + 1) * (2^B - 1) / 2 is exactly 0 at -s and exactly 2^B - 1 at +s, so clipped
  # values always get the outermost codes (dividing by the step could land just below them).
  half_max_code = 0.5 * float(num_levels(bits) - 1)
  positions = (tf.math.divide_no_nan(clipped, threshold) + 1.0) * half_max_code
  if rounding == 'nearest':
    rounded = tf.floor(positions + 0.5)
  else:
    rounded = tf.floor(positions + _uniform_noise(tf.shape(positions), dtype, seed))
  codes = tf.clip_by_value(rounded, 0.0, float(num_levels(bits) - 1))
  quantized = QuantizedTensor(
    codes=tf.cast(codes, tf.int32), threshold=threshold, bits=bits, dtype=x.dtype
  )
  return quantized, values, clipped, positions, codes


def dequantize(quantized: QuantizedTensor) -> tf.Tensor:
  """Maps codes back to levels -s + code * step, in the original dtype and shape."""
  if not isinstance(quantized, QuantizedTensor):
    raise TypeError(f'`quantized` must be a QuantizedTensor. Found {type(quantized).__name__}.')
  if not quantized.codes.dtype.is_integer:
    raise TypeError(f'codes must be an integer tensor. Found {quantized.codes.dtype.name}.')
  return dequantize_codes(quantized.codes, quantized.threshold, quantized.bits, quantized.dtype)


def dequantize_codes(
  codes: tf.Tensor, threshold: tf.Tensor, bits: int, dtype: tf.DType
) -> tf.Tensor:
  """`dequantize` on raw parts: levels -s + code * 2s/(2^B - 1) in `dtype`.

  Args:
    codes: integer codes in [0, 2^bits - 1], any shape.
    threshold: clipping threshold s: a scalar, or a vector over the last axis of `codes`.
    bits: bits per code, 1..16.
    dtype: floating dtype of the result (float64 is computed in float64, others in float32).
  """
  bits = validate_bits(bits)
  work_dtype = compute_dtype(dtype)
  threshold = as_compute_tensor(threshold, work_dtype)
  step = quantization_step(threshold, bits)
  codes = tf.cast(codes, work_dtype)
  max_code = float(num_levels(bits) - 1)
  # Each level is measured from the nearer end (2^B - 1 is odd, so no code is in the middle):
  # codes 0 and 2^B - 1 give exactly -s and +s and the level set is exactly symmetric, however
  # the graph optimizer evaluates the step (it may turn the division into a reciprocal multiply).
  levels = tf.where(
    2.0 * codes > max_code, threshold - (max_code - codes) * step, codes * step - threshold
  )
  return tf.cast(levels, dtype)


def fake_quantize(
  x: tf.Tensor,
  bits: int,
  threshold: tf.Tensor,
  rounding: str = 'nearest',
  seed: Optional[tf.Tensor] = None,
) -> tf.Tensor:
  """dequantize(quantize(x)): the value the receiver reconstructs, in x's dtype.

  Args:
    x: floating-point tensor.
    bits: bits per code, 1..16.
    threshold: clipping threshold s >= 0: a scalar, or a vector over the last axis of `x`.
    rounding: 'nearest' or 'stochastic'.
    seed: an int or a stateless RNG seed of shape [2] for stochastic rounding; None draws a
      fresh random seed.
  """
  return dequantize(quantize(x, bits, threshold, rounding, seed))
