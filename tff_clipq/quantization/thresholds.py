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
than max |x|'s.

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

from tff_clipq.quantization import mse_histogram
from tff_clipq.quantization import quantizer

NOISE_MODELS = ('matched', 'paper')
CLIPPING_METHODS = ('octav', 'octav_paper', 'max_abs', 'mean_optimal')
_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
_UNROLLED_FIXED_POINT_UPDATES = 3
# Groups this large (static shape) are refined on the histogram model (`mse_histogram`): one pass
# over the data and a search on 256 bins beat a dozen exact passes (one CPU thread, the CNN's
# 40,000-entry kernel: about 1.1 -> 0.7 ms). Smaller groups search the exact MSE.
HISTOGRAM_MIN_ENTRIES = 1024
# `optimal_clipping_thresholds` searches tensors with fewer entries per group than this as one
# batch: their searches cost per-operation overhead rather than arithmetic.
_BATCH_MAX_ENTRIES = 8192
# `_exact_mse` of one group evaluates up to this many candidate thresholds one at a time.
_SCALAR_CANDIDATES = 4


def noise_coefficient(bits: int, rounding: str = 'nearest', noise_model: str = 'matched') -> float:
  """c in `rounding-noise variance = c * s^2` for the given quantizer and rounding mode."""
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
_is_unit_weight = mse_histogram.is_unit_weight
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


def _largest_magnitude(magnitudes: tf.Tensor) -> tf.Tensor:
  """max |x| per group [groups]; 0 for an empty group (whose reduce_max would be -inf)."""
  return tf.maximum(tf.reduce_max(magnitudes, axis=-1), 0.0)


def _normalized_magnitudes(magnitudes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(|x| / max|x|, max|x|, max of |x| / max|x|) per group; the last is 1, or 0 if all zero.

  The threshold search runs on values in [0, 1] and its result is scaled back, so squared errors
  neither underflow (tiny tensors) nor overflow (huge ones) and thresholds scale with the data.
  """
  scale = _largest_magnitude(magnitudes)
  largest = tf.cast(scale > 0.0, scale.dtype)  # x / x = 1 exactly.
  return tf.math.divide_no_nan(magnitudes, scale[:, None]), scale, largest


def max_abs_threshold(x: tf.Tensor, per_channel: bool = False) -> tf.Tensor:
  """The conventional, unclipped range: max |x| over finite entries."""
  magnitudes, _ = _grouped_magnitudes(x, per_channel)
  return _ungroup(_largest_magnitude(magnitudes), per_channel)


def _fixed_point_iteration(
    magnitudes: tf.Tensor,
    finite_count: tf.Tensor,
    coefficient: float,
    max_iterations: int,
    tolerance: float,
    rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """Iterates s <- E[|x| 1{|x|>=s}] / (c P(|x|<s) + P(|x|>=s)) per group; returns [groups].

  c = `coefficient` x `rounding_weight` (1/K: the error of the mean of K copies).

  Entries equal to s count as clipped (the derivative from below): with a strict `>` a tensor
  whose nonzero magnitudes are all equal (constant, or +-c) oscillates between |c| and 0.
  """
  if not _is_unit_weight(rounding_weight):
    coefficient = coefficient * rounding_weight
  count = tf.maximum(finite_count, 1.0)
  fraction_finite = finite_count / count
  start = tf.reduce_sum(magnitudes, axis=-1) / count  # E|x|: positive unless all zero.

  def update(threshold: tf.Tensor) -> tf.Tensor:
    # Non-finite entries have magnitude 0: never above a positive threshold, and a zero
    # threshold (all magnitudes zero) stays zero whatever they count as.
    above = magnitudes >= threshold[:, None]
    fraction_above = tf.reduce_sum(tf.cast(above, magnitudes.dtype), axis=-1) / count
    clipped_mass = tf.reduce_sum(tf.where(above, magnitudes, 0.0), axis=-1) / count
    return tf.math.divide_no_nan(
        clipped_mass, coefficient * (fraction_finite - fraction_above) + fraction_above
    )

  def not_converged(iteration, threshold, previous):
    change = tf.abs(threshold - previous)
    return tf.logical_and(
        iteration < max_iterations,
        tf.reduce_any(change > tolerance * tf.maximum(threshold, 1e-30)),
    )

  def body(iteration, threshold, unused_previous):
    return iteration + 1, update(threshold), threshold

  # Most searches converge in 3-7 updates (more at 8+ bits): the first few run unrolled, without
  # the per-iteration overhead of the loop's control flow.
  unrolled = min(_UNROLLED_FIXED_POINT_UPDATES, max_iterations)
  previous, threshold = start, update(start)
  for _ in range(unrolled):
    previous, threshold = threshold, update(threshold)
  _, threshold, _ = tf.while_loop(
      not_converged, body, (tf.constant(unrolled), threshold, previous)
  )
  return threshold


def _exact_mse(
    magnitudes: tf.Tensor,
    finite_count: tf.Tensor,
    threshold: tf.Tensor,
    bits: int,
    rounding: str,
    rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """Exact (expected, for stochastic rounding) MSE per group at per-group `threshold`.

  The rounding error is multiplied by `rounding_weight` (1/K: the mean of K copies' error).

  `threshold` is [groups], or [candidates, groups] to evaluate several thresholds per group in one
  pass; the result has the shape of `threshold`. This is the search's inner loop, so it works in
  units of the quantization step and keeps full-size operations few: with p the position of
  min(|x|, s) on the code axis, the rounding error is step^2 (p - round(p))^2 (nearest) or
  step^2 f (1 - f), f = p - floor(p) (stochastic), and the clipping error is (|x| - s)^2 above s.
  Non-finite entries have magnitude 0 there, whose position (2^B - 1) / 2 is a half-integer, so
  each adds exactly 1/4 step^2, which is subtracted instead of masking every entry.
  """
  candidates = threshold.shape[0] if threshold.shape.rank == 2 else None
  if magnitudes.shape[0] == 1 and candidates is not None and candidates <= _SCALAR_CANDIDATES:
    # One group: a threshold of one element per evaluation keeps every full-size operation on
    # TensorFlow's scalar fast path; [candidates, 1, 1] against [1, n] takes the general
    # broadcast, about 2.5x slower per entry.
    return tf.stack([
        _exact_mse(magnitudes, finite_count, threshold[c], bits, rounding, rounding_weight)
        for c in range(candidates)
    ])
  step = quantizer.quantization_step(threshold, bits)
  threshold = threshold[..., None]
  # As in `quantizer.quantize`: exactly 2^B - 1 for clipped entries (no spurious rounding error).
  half_max_code = 0.5 * float(quantizer.num_levels(bits) - 1)
  codes_per_unit = tf.math.divide_no_nan(tf.constant(half_max_code, magnitudes.dtype), threshold)
  clipped = tf.minimum(magnitudes, threshold)
  position = clipped * codes_per_unit + half_max_code
  if position.shape.rank == 2 and position.shape[0] == 1:
    # One group at one threshold, [1, n] entries: one operation (`quantizer.square_sum`) where
    # a square and a sum are two.
    square_sum = lambda t: tf.reshape(quantizer.square_sum(t), [1])
  else:
    square_sum = lambda t: tf.reduce_sum(tf.square(t), axis=-1)
  if rounding == 'nearest':
    rounding_sum = square_sum(position - tf.round(position))
  else:
    fraction = position - tf.floor(position)
    rounding_sum = tf.reduce_sum(fraction, axis=-1) - square_sum(fraction)
  total = tf.shape(magnitudes, out_type=tf.int64)[-1]
  nonfinite = tf.cast(total, magnitudes.dtype) - finite_count
  rounding_sum -= 0.25 * nonfinite
  clipping_sum = square_sum(magnitudes - clipped)
  rounding_scale = tf.square(step)
  if not _is_unit_weight(rounding_weight):
    rounding_scale = rounding_scale * rounding_weight
  return (clipping_sum + rounding_scale * rounding_sum) / tf.maximum(finite_count, 1.0)


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
  """
  bits = quantizer.validate_bits(bits)
  rounding = quantizer.validate_rounding(rounding)
  num_clients = validate_num_clients(num_clients)
  magnitudes, finite_count = _grouped_magnitudes(x, per_channel)
  rounding_weight = _rounding_weight(num_clients, rounding, magnitudes.dtype)
  threshold = quantizer.as_compute_tensor(threshold, magnitudes.dtype)
  threshold = tf.broadcast_to(tf.reshape(threshold, [-1]), [tf.shape(magnitudes)[0]])
  return _ungroup(
      _exact_mse(magnitudes, finite_count, threshold, bits, rounding, rounding_weight),
      per_channel,
  )


def _golden_section_refinement(
    magnitudes: tf.Tensor,
    finite_count: tf.Tensor,
    lower: tf.Tensor,
    upper: tf.Tensor,
    bits: int,
    rounding: str,
    iterations: int,
    anchors: tf.Tensor,
    rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """Golden-section search of the exact MSE on [lower, upper] per group; returns the best point.

  Each iteration keeps [low, right] if MSE(left) <= MSE(right), else [left, high], with the inner
  points left = high - g (high - low), right = low + g (high - low), g = (sqrt(5) - 1) / 2. Since
  g^2 = 1 - g, the inner point that stays inside is an inner point of the new interval too (old
  left = new right, or old right = new left): its MSE is carried over and each iteration
  evaluates the MSE at one new point only. `anchors` [A, groups] (e.g. the fixed point and
  max |x|) are evaluated in the same pass as the first two inner points; the result is the point
  of least exact MSE among all points evaluated, so it is never worse than any anchor.
  """

  def mse(threshold):
    return _exact_mse(magnitudes, finite_count, threshold, bits, rounding, rounding_weight)

  def body(iteration, low, high, left, right, left_mse, right_mse, best, best_mse):
    keep_left = left_mse <= right_mse
    low = tf.where(keep_left, low, left)
    high = tf.where(keep_left, right, high)
    width = high - low
    new_point = tf.where(
        keep_left, high - _GOLDEN_RATIO_CONJUGATE * width, low + _GOLDEN_RATIO_CONJUGATE * width
    )
    new_mse = mse(new_point)
    best, best_mse = _keep_better(best, best_mse, new_point, new_mse)
    return (
        iteration + 1,
        low,
        high,
        tf.where(keep_left, new_point, right),
        tf.where(keep_left, left, new_point),
        tf.where(keep_left, new_mse, right_mse),
        tf.where(keep_left, left_mse, new_mse),
        best,
        best_mse,
    )

  width = upper - lower
  left = upper - _GOLDEN_RATIO_CONJUGATE * width
  right = lower + _GOLDEN_RATIO_CONJUGATE * width
  points = tf.concat([tf.stack([left, right]), anchors], axis=0)  # [2 + A, groups]
  errors = mse(points)
  best, best_mse = _best_candidate(points, errors)
  state = (0, lower, upper, left, right, errors[0], errors[1], best, best_mse)
  for _ in range(iterations):
    state = body(*state)
  return state[-2]


def _keep_better(
    best: tf.Tensor, best_mse: tf.Tensor, point: tf.Tensor, point_mse: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """Per group, (point, its MSE) where that MSE is lower than `best_mse`, else (best, best_mse)."""
  better = point_mse < best_mse
  return tf.where(better, point, best), tf.where(better, point_mse, best_mse)


def _best_candidate(candidates: tf.Tensor, errors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(candidate, its error) of least error per group, from [candidates, groups] tensors."""
  best = tf.argmin(errors, axis=0)
  return (
      tf.gather(tf.transpose(candidates), best, batch_dims=1),
      tf.gather(tf.transpose(errors), best, batch_dims=1),
  )


# Small tensors: there the golden-section loop costs its iterations' per-op overhead, not
# arithmetic, so a search that evaluates several candidates per iteration in one vectorized pass
# and needs only a few iterations is faster (measured at 24 golden-section steps on the CNN's
# tensors, one CPU thread: 144 entries 0.93 -> 0.47 ms, 1,000 entries 0.97 -> 0.67 ms). It is
# used while candidates x entries of a group, and of all groups, stay within these bounds (up to
# 1,024 entries per group).
_GRID_MAX_POINTS = 32
_GRID_MIN_POINTS = 8
_GRID_MAX_CANDIDATE_ENTRIES = 1 << 13  # Candidates x entries of one group.
_GRID_MAX_TOTAL_ENTRIES = 1 << 22  # Candidates x entries of all groups.


def _grid_points(groups, entries):
  """Candidates per iteration of `_grid_refinement` for [groups, entries]; 0 means golden section.

  Python ints in, Python int out; tensors in (shapes known only at run time), tensor out.
  """
  if isinstance(groups, int) and isinstance(entries, int):
    if entries == 0:
      return 0
    points = min(_GRID_MAX_POINTS, _GRID_MAX_CANDIDATE_ENTRIES // entries)
    fits = points >= _GRID_MIN_POINTS and points * groups * entries <= _GRID_MAX_TOTAL_ENTRIES
    return points if fits else 0
  groups, entries = tf.cast(groups, tf.int64), tf.cast(entries, tf.int64)
  points = tf.minimum(
      tf.constant(_GRID_MAX_POINTS, tf.int64),
      tf.math.floordiv(tf.constant(_GRID_MAX_CANDIDATE_ENTRIES, tf.int64), tf.maximum(entries, 1)),
  )
  fits = tf.logical_and(
      tf.logical_and(entries > 0, points >= _GRID_MIN_POINTS),
      points * groups * entries <= _GRID_MAX_TOTAL_ENTRIES,
  )
  return tf.where(fits, points, tf.zeros_like(points))


def _grid_refinement(
    magnitudes: tf.Tensor,
    finite_count: tf.Tensor,
    lower: tf.Tensor,
    upper: tf.Tensor,
    bits: int,
    rounding: str,
    points,
    golden_iterations: int,
    anchors: tf.Tensor,
    rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """Repeated grid search of the exact MSE on [lower, upper] per group; returns the best point.

  Each iteration evaluates `points` evenly spaced interior points of [low, high] at once and keeps
  the two grid cells around the best one, shrinking the interval by 2 / (points + 1). It runs
  until the interval is no wider than `golden_iterations` golden-section steps leave it. The
  result is the point of least exact MSE among all points evaluated and `anchors` [A, groups].
  """
  dtype = magnitudes.dtype

  def mse(threshold):
    return _exact_mse(magnitudes, finite_count, threshold, bits, rounding, rounding_weight)

  # (2 / divisions)^iterations <= g^golden_iterations.
  golden_log_width = golden_iterations * math.log(_GOLDEN_RATIO_CONJUGATE)
  if isinstance(points, int):
    iterations = math.ceil(golden_log_width / math.log(2.0 / (points + 1)))
  else:
    iterations = tf.cast(
        tf.math.ceil(golden_log_width / tf.math.log(2.0 / (tf.cast(points, dtype) + 1.0))),
        tf.int32,
    )
  divisions = tf.cast(points, dtype) + 1.0
  fractions = tf.range(1.0, divisions, dtype=dtype)[:, None] / divisions  # [points, 1]

  def body(iteration, low, high, best, best_mse):
    cell = (high - low) / divisions
    candidates = low + fractions * (high - low)  # [points, groups]
    grid_best, grid_best_mse = _best_candidate(candidates, mse(candidates))
    best, best_mse = _keep_better(best, best_mse, grid_best, grid_best_mse)
    return iteration + 1, grid_best - cell, grid_best + cell, best, best_mse

  best, best_mse = _best_candidate(anchors, mse(anchors))
  state = (0, lower, upper, best, best_mse)
  if isinstance(iterations, int):  # Unrolled: no per-iteration control-flow overhead.
    for _ in range(iterations):
      state = body(*state)
    return state[3]
  return tf.while_loop(lambda iteration, *_: iteration < iterations, body, state)[3]


def _refinement(
    magnitudes: tf.Tensor,
    finite_count: tf.Tensor,
    lower: tf.Tensor,
    upper: tf.Tensor,
    bits: int,
    rounding: str,
    golden_iterations: int,
    anchors: tf.Tensor,
    rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """Grid search for the smallest groups, golden-section search otherwise (same resolution).

  Returns the point of least exact MSE (its rounding term weighted by `rounding_weight`) among
  those evaluated and `anchors` [A, groups].
  """
  arguments = (magnitudes, finite_count, lower, upper, bits, rounding)

  def golden():
    return _golden_section_refinement(
        *arguments, golden_iterations, anchors, rounding_weight=rounding_weight
    )

  groups, entries = magnitudes.shape
  if groups is not None and entries is not None:
    points = _grid_points(int(groups), int(entries))
    if not points:
      return golden()
    return _grid_refinement(
        *arguments, points, golden_iterations, anchors, rounding_weight=rounding_weight
    )
  shape = tf.shape(magnitudes)
  points = _grid_points(shape[0], shape[1])  # The same choice, made at run time.
  return tf.cond(
      points > 0,
      lambda: _grid_refinement(
          *arguments, points, golden_iterations, anchors, rounding_weight=rounding_weight
      ),
      golden,
  )


def octav_threshold(
    x: tf.Tensor,
    bits: int,
    rounding: str = 'nearest',
    noise_model: str = 'matched',
    per_channel: bool = False,
    max_iterations: int = 100,
    tolerance: float = 1e-5,
) -> tf.Tensor:
  """The OCTAV fixed point of the noise model alone, without refinement on the exact MSE."""
  coefficient = noise_coefficient(bits, rounding, noise_model)
  magnitudes, finite_count = _grouped_magnitudes(x, per_channel)
  magnitudes, scale, largest = _normalized_magnitudes(magnitudes)
  threshold = _fixed_point_iteration(
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
  """
  bits = quantizer.validate_bits(bits)
  rounding = quantizer.validate_rounding(rounding)
  num_clients = validate_num_clients(num_clients)
  magnitudes, finite_count = _grouped_magnitudes(x, per_channel)
  threshold = _optimal_grouped_thresholds(
      magnitudes, finite_count, bits, rounding, max_iterations, tolerance, refinement_iterations,
      rounding_weight=_rounding_weight(num_clients, rounding, magnitudes.dtype),
  )
  return _ungroup(threshold, per_channel)


def _optimal_grouped_thresholds(
    magnitudes: tf.Tensor,
    finite_count: tf.Tensor,
    bits: int,
    rounding: str,
    max_iterations: int = 100,
    tolerance: float = 1e-2,
    refinement_iterations: int = 11,
    rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """`optimal_clipping_threshold` of each row of `_grouped_magnitudes`' output: [groups].

  `rounding_weight`: 1/K for the mean of K copies (`_rounding_weight`), in the magnitudes' dtype.
  """
  if _searched_on_histograms(magnitudes):
    return _histogram_thresholds(
        [(magnitudes, finite_count)], bits, rounding, refinement_iterations, rounding_weight
    )[0]
  coefficient = noise_coefficient(bits, rounding)
  magnitudes, scale, largest = _normalized_magnitudes(magnitudes)
  fixed_point = tf.minimum(
      _fixed_point_iteration(
          magnitudes, finite_count, coefficient, max_iterations, tolerance, rounding_weight
      ),
      largest,
  )
  lower, upper = 0.5 * fixed_point, tf.minimum(2.0 * fixed_point, largest)
  anchors = tf.stack([fixed_point, largest], axis=0)  # [2, groups]
  threshold = _refinement(
      magnitudes, finite_count, lower, upper, bits, rounding, refinement_iterations, anchors,
      rounding_weight=rounding_weight,
  )
  return threshold * scale


def _searched_on_histograms(magnitudes: tf.Tensor) -> bool:
  entries = magnitudes.shape[1]
  return entries is not None and entries >= HISTOGRAM_MIN_ENTRIES


def _histogram_thresholds(
    blocks: Sequence[tuple[tf.Tensor, tf.Tensor]],
    bits: int,
    rounding: str,
    refinement_iterations: int = 11,
    rounding_weight: RoundingWeight = 1.0,
) -> list[tf.Tensor]:
  """`_optimal_grouped_thresholds` of blocks of groups: (magnitudes [groups, n], finite_count).

  `rounding_weight` (1/K, the blocks' dtype) weights the rounding error everywhere.

  Per block, one histogram pass for the fixed point, one for the MSE model and one exact
  comparison read the entries; the fixed point and the model search, whose cost is a few
  hundred small operations whatever the block's size, run once on all blocks' histograms.
  """
  coefficient = noise_coefficient(bits, rounding)
  normalized = [(_normalized_magnitudes(m), f) for m, f in blocks]
  sizes = [m.shape[0] for (m, _, _), _ in normalized]
  largest = tf.concat([largest for (_, _, largest), _ in normalized], axis=0)
  counts = tf.concat([mse_histogram.fixed_point_counts(m, f) for (m, _, _), f in normalized], 0)
  fixed_point = tf.minimum(
      mse_histogram.fixed_point(counts, coefficient, rounding_weight), largest
  )
  lower, upper = 0.5 * fixed_point, tf.minimum(2.0 * fixed_point, largest)
  histograms = [
      mse_histogram.histogram(m, f, block_upper)
      for ((m, _, _), f), block_upper in zip(normalized, tf.split(upper, sizes))
  ]
  modelled_best = mse_histogram.histogram_search(
      tuple(tf.concat(parts, axis=0) for parts in zip(*histograms)), lower, upper, bits, rounding,
      relative_resolution=_GOLDEN_RATIO_CONJUGATE**refinement_iterations,
      rounding_weight=rounding_weight,
  )
  candidates = tf.stack([fixed_point, largest, modelled_best], axis=0)  # [3, groups]
  thresholds = []
  for ((m, scale, _), f), block_candidates in zip(
      normalized, tf.split(candidates, sizes, axis=1)
  ):
    errors = _exact_mse(m, f, block_candidates, bits, rounding, rounding_weight)
    thresholds.append(_best_candidate(block_candidates, errors)[0] * scale)
  return thresholds


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
  defined shapes and fewer than `_BATCH_MAX_ENTRIES` entries per group are therefore padded
  with zeros outside their finite counts (ignored, like non-finite entries) to a common length
  and searched as the groups of one block; larger tensors are blocks of their own. Blocks of at
  least `HISTOGRAM_MIN_ENTRIES` entries per group then share one histogram search
  (`_histogram_thresholds`); the others are searched one by one. The result for a tensor equals
  its own search's up to the search resolution. `all_finite=True` promises that every entry is
  finite (the caller has checked), which skips the handling of non-finite entries; with a
  non-finite entry the thresholds are then undefined. `num_clients`: as in
  `optimal_clipping_threshold` (the error of the mean of that many copies).
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
  batched = [
      i for i, (magnitudes, _) in enumerate(grouped)
      if magnitudes.shape.is_fully_defined()
      and 0 < magnitudes.shape[1] < _BATCH_MAX_ENTRIES
      and magnitudes.dtype == grouped[0][0].dtype
  ]
  blocks = []  # (indices of the tensors, magnitudes, finite_count)
  for i, (magnitudes, finite_count) in enumerate(grouped):
    if i not in batched or len(batched) == 1:
      blocks.append(([i], magnitudes, finite_count))
  if len(batched) > 1:
    length = max(grouped[i][0].shape[1] for i in batched)
    pad = lambda t: tf.pad(t, [[0, 0], [0, length - t.shape[1]]])
    blocks.append((
        batched,
        tf.concat([pad(grouped[i][0]) for i in batched], axis=0),
        tf.concat([grouped[i][1] for i in batched], axis=0),
    ))
  eligible = [k for k, block in enumerate(blocks) if _searched_on_histograms(block[1])]
  shared = [k for k in eligible if blocks[k][1].dtype == blocks[eligible[0]][1].dtype]
  block_thresholds = [None] * len(blocks)
  if shared:
    searched = _histogram_thresholds(
        [blocks[k][1:] for k in shared], bits, rounding,
        rounding_weight=rounding_weight(blocks[shared[0]][1].dtype),
    )
    for k, found in zip(shared, searched):
      block_thresholds[k] = found
  thresholds = [None] * len(tensors)
  for (indices, magnitudes, finite_count), found in zip(blocks, block_thresholds):
    if found is None:
      found = _optimal_grouped_thresholds(
          magnitudes, finite_count, bits, rounding,
          rounding_weight=rounding_weight(magnitudes.dtype),
      )
    groups = [grouped[i][0].shape[0] for i in indices]
    for i, part in zip(indices, tf.split(found, groups) if len(indices) > 1 else [found]):
      thresholds[i] = part
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
  is validated (>= 1, finite) whatever the method."""
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
    return octav_threshold(x, bits, rounding, noise_model='paper', per_channel=per_channel)
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

  `all_finite`: as in `optimal_clipping_thresholds` (used by 'octav' and 'mean_optimal' only).
  `num_clients`: as in `clipping_threshold` (used by 'mean_optimal' only).
  """
  num_clients = validate_num_clients(num_clients)
  if method == 'octav':
    return optimal_clipping_thresholds(tensors, bits, rounding, per_channel, all_finite)
  if method == 'mean_optimal':
    return optimal_clipping_thresholds(
        tensors, bits, rounding, per_channel, all_finite, num_clients=num_clients
    )
  return [clipping_threshold(x, bits, method, rounding, per_channel) for x in tensors]
