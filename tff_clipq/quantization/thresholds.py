"""Clipping thresholds for the symmetric B-bit uniform quantizer of `quantizer.py`.

The mean squared error of clipping at s and quantizing with step 2s/(2^B - 1) is modelled as

    J(s) = c * s^2 * P(|x| <= s) + E[(|x| - s)^2 1{|x| > s}],

where c * s^2 is the rounding-noise variance inside the range. For *this* quantizer,
step^2 / 12 (nearest rounding) gives c = 1 / (3 (2^B - 1)^2), and step^2 / 6 (stochastic rounding,
whose noise variance is step^2 p (1 - p), on average twice that of nearest rounding) gives
c = 2 / (3 (2^B - 1)^2). Setting dJ/ds = 0 (OCTAV, Sakr et al. 2022) gives the fixed point

    s = E[|x| 1{|x| > s}] / (c P(|x| <= s) + P(|x| > s)).

The clipped-quantization paper (Bozorgasl & Chen 2024) uses c = 4^-B / 3, which belongs to a
step of 2s / 2^B and ignores the rounding mode; it is kept as `noise_model='paper'` for comparison.

The noise model is an approximation (it is poor at 1-2 bits and ignores the density term of
dJ/ds). `optimal_clipping_threshold` therefore refines the fixed point on the MSE of the quantizer
actually used: on the *exact* empirical MSE (`expected_quantization_mse`) by golden-section or
grid search for tensors of up to a few thousand entries, and for larger ones on an accurate model
of it built from one histogram of |x| (`mse_histogram`: one pass over the data instead of one per
search step). It never returns a threshold whose exact MSE is worse than the fixed point's or
than max |x|'s. This module holds the entry points: it validates the arguments, groups the
entries and picks the method; the search itself is in `threshold_search` (the fixed point, the
choice of refinement by size, the batching of small tensors) and `exact_mse` (the exact MSE and
the golden-section and grid searches of it).

All functions accept a tensor of any shape; with `per_channel=True` one threshold is computed for
each slice along the last axis (a Keras kernel's output channels). Non-finite entries are ignored
in the statistics; a tensor with no nonzero finite entry gets threshold 0.

The error of the mean (`num_clients`, clipping method 'mean_optimal'). In federated averaging
K clients with alike values each send a quantized copy and the server averages them. Their
clipping errors have the same sign and do not average out, while stochastic rounding noise is
unbiased and independent across clients: its variance is divided by K. For K copies of x, each
stochastically rounded, the squared error of the mean per entry is exactly

    J_K(s) = E[(|x| - s)^2 1{|x| > s}] + (1/K) E[rounding variance],

the exact expected MSE with its rounding term weighted by 1/K (`rounding_weight` inside, also
c -> c/K in the fixed point). Its minimizer clips less as K grows (max |x| as K -> infinity);
K = 1 is 'octav'. Nearest rounding's error is deterministic, shared by identical copies and not
reduced by averaging, so there K has no effect.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import tensorflow as tf

from tff_clipq.quantization import exact_mse
from tff_clipq.quantization import mse_histogram
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import threshold_search

NOISE_MODELS = ('matched', 'paper')
CLIPPING_METHODS = ('octav', 'octav_paper', 'max_abs', 'mean_optimal')
# Groups this large (static shape) are refined on a histogram model of the MSE
# (`threshold_search`); smaller ones search the exact MSE.
HISTOGRAM_MIN_ENTRIES = threshold_search.HISTOGRAM_MIN_ENTRIES


def noise_coefficient(bits: int, rounding: str = 'nearest', noise_model: str = 'matched') -> float:
  """c in `rounding-noise variance = c * s^2` for the given quantizer and rounding mode.

  Args:
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'; ignored by the 'paper' noise model.
    noise_model: 'matched' (this quantizer's step and rounding mode) or 'paper' (4^-B / 3).

  Raises:
    ValueError: for invalid `bits`, `rounding` or `noise_model`.
  """
  bits = quantizer.validate_bits(bits)
  rounding = quantizer.validate_rounding(rounding)
  if noise_model == 'paper':
    return 4.0**-bits / 3.0
  if noise_model != 'matched':
    raise ValueError(f'`noise_model` must be one of {NOISE_MODELS}. Found {noise_model!r}.')
  rounding_factor = 1.0 if rounding == 'nearest' else 2.0
  return rounding_factor / (3.0 * (quantizer.num_levels(bits) - 1) ** 2)


# 1/K, the weight of the rounding error in the error of the mean of K copies: a Python float, or a
# scalar tensor of the compute dtype (known at run time). The Python constant 1.0 (one client,
# nearest rounding) costs no operation anywhere.
RoundingWeight = mse_histogram.RoundingWeight
NumClients = Union[float, tf.Tensor]


def validate_num_clients(num_clients: NumClients) -> NumClients:
  """A finite Python number >= 1 as a float, or a scalar numeric tensor (clamped to >= 1 later).

  Raises ValueError naming `num_clients` for a Python number < 1, a non-finite one, a bool or a
  tensor of known rank other than 0; TypeError for a non-numeric tensor.
  """
  if isinstance(num_clients, bool) or (
    isinstance(num_clients, numbers.Number) and not isinstance(num_clients, numbers.Real)
  ):
    raise ValueError(f'`num_clients` must be a finite number >= 1. Found {num_clients!r}.')
  if isinstance(num_clients, numbers.Real):
    if not (math.isfinite(num_clients) and num_clients >= 1):
      raise ValueError(f'`num_clients` must be a finite number >= 1. Found {num_clients!r}.')
    return float(num_clients)
  tensor = tf.convert_to_tensor(num_clients)
  if not (tensor.dtype.is_floating or tensor.dtype.is_integer):
    raise TypeError(f'`num_clients` must be a number. Found a tensor of dtype {tensor.dtype.name}.')
  if tensor.shape.rank is not None and tensor.shape.rank != 0:
    raise ValueError(f'`num_clients` must be a scalar. Found shape {tensor.shape}.')
  return tensor


def _rounding_weight(num_clients: NumClients, rounding: str, dtype: tf.DType) -> RoundingWeight:
  """1/K for stochastic rounding (a tensor K clamped to >= 1, NaN to 1); 1.0 for nearest.

  `num_clients` as returned by `validate_num_clients`.
  """
  if rounding == 'nearest':
    return 1.0  # Deterministic rounding error: identical copies share it, averaging keeps it.
  if not tf.is_tensor(num_clients):
    return 1.0 / num_clients
  clients = tf.cast(num_clients, dtype)
  return 1.0 / tf.where(clients >= 1.0, clients, tf.ones_like(clients))


def _grouped_magnitudes(
  x: tf.Tensor, per_channel: bool, all_finite: bool = False
) -> tuple[tf.Tensor, tf.Tensor]:
  """Returns (|x| [groups, n], finite entries per group [groups]) in the compute dtype.

  Non-finite entries get magnitude 0; the statistics need only their number, not where they are.
  `all_finite` promises there are none and skips the per-entry test and select.
  """
  x = quantizer.validate_float_tensor(x)
  dtype = quantizer.compute_dtype(x.dtype)
  values = tf.cast(x, dtype)
  if per_channel:
    if x.shape.rank is None or x.shape.rank < 1:
      raise ValueError(f'per-channel thresholds need a tensor of rank >= 1. Found shape {x.shape}.')
    grouped = tf.transpose(tf.reshape(values, [-1, tf.shape(values)[-1]]))
  else:
    grouped = tf.reshape(values, [1, -1])
  if all_finite:
    entries = tf.cast(tf.shape(grouped)[1], dtype)
    return tf.abs(grouped), tf.fill(tf.shape(grouped)[:1], entries)
  finite = tf.math.is_finite(grouped)
  magnitudes = tf.where(finite, tf.abs(grouped), tf.zeros_like(grouped))
  return magnitudes, tf.reduce_sum(tf.cast(finite, dtype), axis=-1)


def _ungroup(thresholds: tf.Tensor, per_channel: bool) -> tf.Tensor:
  return thresholds if per_channel else tf.squeeze(thresholds, axis=0)


def max_abs_threshold(x: tf.Tensor, per_channel: bool = False) -> tf.Tensor:
  """The conventional, unclipped range: max |x| over finite entries.

  Args:
    x: floating-point tensor of any shape.
    per_channel: one threshold per slice of the last axis instead of one for the tensor.

  Returns:
    A scalar, or [channels] if `per_channel`, in the compute dtype.
  """
  magnitudes, _ = _grouped_magnitudes(x, per_channel)
  return _ungroup(threshold_search.largest_magnitude(magnitudes), per_channel)


def expected_quantization_mse(
  x: tf.Tensor,
  threshold: tf.Tensor,
  bits: int,
  rounding: str = 'nearest',
  per_channel: bool = False,
  num_clients: NumClients = 1,
) -> tf.Tensor:
  """Exact mean squared error of quantize/dequantize at `threshold` (expected, if stochastic).

  For nearest rounding this is the MSE the quantizer produces; for stochastic rounding it is its
  expectation over the rounding noise (variance step^2 p (1 - p) at fractional position p).

  With `num_clients` = K (a number >= 1, or a scalar tensor clamped to >= 1) it is the expected
  squared error per entry of the mean of K independent quantizations of x: clipping error plus
  the rounding variance / K for stochastic rounding; nearest rounding ignores K (its error is
  the same in every copy).

  Args:
    x: floating-point tensor of any shape; non-finite entries are ignored.
    threshold: clipping threshold: a scalar, or [channels] with `per_channel`.
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    per_channel: one MSE per slice of the last axis instead of one for the tensor.
    num_clients: K, the number of independently quantized copies averaged.

  Returns:
    A scalar, or [channels] if `per_channel`.
  """
  bits = quantizer.validate_bits(bits)
  rounding = quantizer.validate_rounding(rounding)
  num_clients = validate_num_clients(num_clients)
  magnitudes, finite_count = _grouped_magnitudes(x, per_channel)
  rounding_weight = _rounding_weight(num_clients, rounding, magnitudes.dtype)
  threshold = quantizer.as_compute_tensor(threshold, magnitudes.dtype)
  threshold = tf.broadcast_to(tf.reshape(threshold, [-1]), [tf.shape(magnitudes)[0]])
  return _ungroup(
    exact_mse.exact_mse(magnitudes, finite_count, threshold, bits, rounding, rounding_weight),
    per_channel,
  )


def octav_fixed_point_threshold(
  x: tf.Tensor,
  bits: int,
  rounding: str = 'nearest',
  noise_model: str = 'matched',
  per_channel: bool = False,
  max_iterations: int = 100,
  tolerance: float = 1e-5,
) -> tf.Tensor:
  """The OCTAV fixed point of the noise model alone, without refinement on the exact MSE.

  Args:
    x: floating-point tensor of any shape; non-finite entries are ignored.
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    noise_model: 'matched' or 'paper' (see `noise_coefficient`).
    per_channel: one threshold per slice of the last axis instead of one for the tensor.
    max_iterations: limit on the fixed-point iterations.
    tolerance: stop once the threshold changes by at most this fraction of itself.

  Returns:
    A scalar, or [channels] if `per_channel`, at most max |x|.
  """
  coefficient = noise_coefficient(bits, rounding, noise_model)
  magnitudes, finite_count = _grouped_magnitudes(x, per_channel)
  magnitudes, scale, largest = threshold_search.normalized_magnitudes(magnitudes)
  threshold = threshold_search.fixed_point_iteration(
    magnitudes, finite_count, coefficient, max_iterations, tolerance
  )
  threshold = tf.minimum(threshold, largest)
  return _ungroup(threshold * scale, per_channel)


def optimal_clipping_threshold(
  x: tf.Tensor,
  bits: int,
  rounding: str = 'nearest',
  per_channel: bool = False,
  max_iterations: int = 100,
  tolerance: float = 1e-2,
  refinement_iterations: int = 11,
  num_clients: NumClients = 1,
) -> tf.Tensor:
  """MSE-optimal clipping threshold for `bits`-bit quantization of `x` with `rounding`.

  With `num_clients` = K (a number >= 1, or a scalar tensor, clamped to >= 1, known at run time)
  it minimizes the error of the mean of K independently quantized copies of x instead
  (`expected_quantization_mse(..., num_clients=K)`): the rounding term weighted by 1/K for
  stochastic rounding; nearest rounding ignores K.

  The OCTAV fixed point with the noise term of this quantizer and rounding mode, refined on
  [s/2, min(2s, max|x|)]: for groups of at least `HISTOGRAM_MIN_ENTRIES` entries (static shape),
  whose fixed point is solved on a histogram too, by a grid search of the MSE modelled from one
  histogram (`mse_histogram`), whose minimizer is then compared with the fixed point and max|x|
  on the exact MSE; for smaller ones by golden-section
  search of the exact MSE (for the smallest by an equally fine repeated grid search, faster
  there), keeping the point of least exact MSE among all points evaluated, the fixed point and
  max|x|. Never worse than either anchor. Scalar per tensor, or [channels] if `per_channel`.

  Resolution: the fixed point only centres the search, so it stops at a relative change of
  `tolerance`; 11 golden-section steps narrow the bracket (1.5 s wide) to 0.0075 s. The exact
  MSE is flat there: a relative threshold error d costs about k d^2 / 2 of the MSE with
  k = s^2 J''(s) / J(s) of order 1-10, i.e. < 1e-4 here (tests: within 1% of a brute-force search,
  and of Max's optimum).

  Args:
    x: floating-point tensor of any shape; non-finite entries are ignored.
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    per_channel: one threshold per slice of the last axis instead of one for the tensor.
    max_iterations: limit on the fixed-point iterations (groups below `HISTOGRAM_MIN_ENTRIES`).
    tolerance: relative change at which the fixed point stops (likewise).
    refinement_iterations: resolution of the refinement, in golden-section steps.
    num_clients: K, the number of independently quantized copies averaged.
  """
  bits = quantizer.validate_bits(bits)
  rounding = quantizer.validate_rounding(rounding)
  num_clients = validate_num_clients(num_clients)
  magnitudes, finite_count = _grouped_magnitudes(x, per_channel)
  threshold = threshold_search.optimal_grouped_thresholds(
    magnitudes,
    finite_count,
    bits,
    rounding,
    noise_coefficient(bits, rounding),
    max_iterations,
    tolerance,
    refinement_iterations,
    rounding_weight=_rounding_weight(num_clients, rounding, magnitudes.dtype),
  )
  return _ungroup(threshold, per_channel)


def optimal_clipping_thresholds(
  tensors: Sequence[tf.Tensor],
  bits: int,
  rounding: str = 'nearest',
  per_channel: bool = False,
  all_finite: bool = False,
  num_clients: NumClients = 1,
) -> list[tf.Tensor]:
  """`optimal_clipping_threshold` of each tensor, with the searches shared where possible.

  Each search costs a few hundred small TensorFlow operations, whose fixed per-operation cost
  dominates for tensors of a few thousand entries (a model's other layers). Tensors with fully
  defined shapes and few entries per group are therefore padded with zeros outside their finite
  counts (ignored, like non-finite entries) to a common length and searched as the groups of one
  block; larger tensors are blocks of their own. Blocks of at least `HISTOGRAM_MIN_ENTRIES`
  entries per group then share one histogram search; the others are searched one by one
  (`threshold_search.batched_thresholds`). The result for a tensor equals its own search's up to
  the search resolution. `all_finite=True` promises that every entry is finite (the caller has
  checked), which skips the handling of non-finite entries; with a non-finite entry the
  thresholds are then undefined. `num_clients`: as in `optimal_clipping_threshold` (the error of
  the mean of that many copies).

  Args:
    tensors: floating-point tensors of any shapes.
    bits: bits per code, 1..16, the same for every tensor.
    rounding: 'nearest' or 'stochastic'.
    per_channel: one threshold per slice of the last axis instead of one per tensor.
    all_finite: True if the caller guarantees that every entry is finite.
    num_clients: K, the number of independently quantized copies averaged.

  Returns:
    One threshold (scalar, or [channels] if `per_channel`) per tensor, in order.
  """
  bits = quantizer.validate_bits(bits)
  rounding = quantizer.validate_rounding(rounding)
  num_clients = validate_num_clients(num_clients)
  rounding_weights = {}  # Per dtype: one conversion of a tensor `num_clients` each.

  def rounding_weight(dtype):
    if dtype not in rounding_weights:
      rounding_weights[dtype] = _rounding_weight(num_clients, rounding, dtype)
    return rounding_weights[dtype]

  grouped = [_grouped_magnitudes(x, per_channel, all_finite) for x in tensors]
  thresholds = threshold_search.batched_thresholds(
    grouped, bits, rounding, noise_coefficient(bits, rounding), rounding_weight
  )
  return [_ungroup(t, per_channel) for t in thresholds]


def clipping_threshold(
  x: tf.Tensor,
  bits: int,
  method: Union[str, float] = 'octav',
  rounding: str = 'nearest',
  per_channel: bool = False,
  num_clients: NumClients = 1,
) -> tf.Tensor:
  """Threshold by `method`: 'octav' (MSE-optimal), 'octav_paper' (the paper's noise model,
  no refinement), 'max_abs' (no clipping), 'mean_optimal' (optimal for the mean of
  `num_clients` independently quantized copies: `optimal_clipping_threshold(...,
  num_clients=num_clients)`; equal to 'octav' for one client or nearest rounding) or a fixed
  positive number. Methods other than 'mean_optimal' ignore `num_clients`, but a Python number
  is validated (>= 1, finite) whatever the method.

  Args:
    x: floating-point tensor of any shape.
    bits: bits per code, 1..16.
    method: one of `CLIPPING_METHODS`, or a fixed positive threshold.
    rounding: 'nearest' or 'stochastic'.
    per_channel: one threshold per slice of the last axis instead of one for the tensor.
    num_clients: K, the number of independently quantized copies averaged ('mean_optimal').

  Returns:
    A scalar, or [channels] if `per_channel`, in the compute dtype.

  Raises:
    ValueError: for an unknown method, a fixed threshold <= 0 or an invalid `num_clients`.
  """
  num_clients = validate_num_clients(num_clients)
  if isinstance(method, (int, float)) and not isinstance(method, bool):
    if not method > 0:
      raise ValueError(f'A fixed clipping threshold must be > 0. Found {method!r}.')
    x = quantizer.validate_float_tensor(x)
    fixed = tf.constant(float(method), quantizer.compute_dtype(x.dtype))
    if per_channel:
      return tf.fill(tf.shape(x)[-1:], fixed)
    return fixed
  if method == 'octav':
    return optimal_clipping_threshold(x, bits, rounding, per_channel)
  if method == 'mean_optimal':
    return optimal_clipping_threshold(x, bits, rounding, per_channel, num_clients=num_clients)
  if method == 'octav_paper':
    return octav_fixed_point_threshold(
      x, bits, rounding, noise_model='paper', per_channel=per_channel
    )
  if method == 'max_abs':
    return max_abs_threshold(x, per_channel)
  raise ValueError(
    f'`clipping` must be one of {CLIPPING_METHODS} or a positive number. Found {method!r}.'
  )


def clipping_thresholds(
  tensors: Sequence[tf.Tensor],
  bits: int,
  method: Union[str, float] = 'octav',
  rounding: str = 'nearest',
  per_channel: bool = False,
  all_finite: bool = False,
  num_clients: NumClients = 1,
) -> list[tf.Tensor]:
  """`clipping_threshold` of each tensor; 'octav' and 'mean_optimal' search small tensors
  together (faster).

  Args:
    tensors: floating-point tensors of any shapes.
    bits: bits per code, 1..16, the same for every tensor.
    method: one of `CLIPPING_METHODS`, or a fixed positive threshold.
    rounding: 'nearest' or 'stochastic'.
    per_channel: one threshold per slice of the last axis instead of one per tensor.
    all_finite: as in `optimal_clipping_thresholds` (used by 'octav' and 'mean_optimal' only).
    num_clients: as in `clipping_threshold` (used by 'mean_optimal' only).

  Returns:
    One threshold (scalar, or [channels] if `per_channel`) per tensor, in order.
  """
  num_clients = validate_num_clients(num_clients)
  if method == 'octav':
    return optimal_clipping_thresholds(tensors, bits, rounding, per_channel, all_finite)
  if method == 'mean_optimal':
    return optimal_clipping_thresholds(
      tensors, bits, rounding, per_channel, all_finite, num_clients=num_clients
    )
  return [clipping_threshold(x, bits, method, rounding, per_channel) for x in tensors]
