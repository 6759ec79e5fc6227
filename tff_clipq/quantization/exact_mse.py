"""The exact quantization MSE of grouped magnitudes, and the searches of it that refine a threshold.

`exact_mse` evaluates the MSE of clipping at s and quantizing (its expectation over the noise for
stochastic rounding) exactly, in one pass over the entries, at one or several candidate
thresholds per group. The OCTAV noise model that gives the starting fixed point is only an
approximation (poor at 1-2 bits, and blind to the density term of dJ/ds), so `threshold_search`
refines the fixed point on this exact MSE for groups of up to a few thousand entries:
`refinement` runs a golden-section search of a bracket around it (one new MSE evaluation per
step) or, for the smallest groups, where each step costs per-operation overhead rather than
arithmetic, an equally fine repeated grid search that evaluates many candidates per pass. Both
keep the point of least exact MSE among all points evaluated and the given anchors (the fixed
point and max |x|), so the result is never worse than an anchor.

Magnitudes come grouped, [groups, n], as `thresholds` prepares them: non-finite entries have
magnitude 0 and are left out through `finite_count`. `rounding_weight` (1/K) multiplies the
rounding error: the error of the mean of K stochastically rounded copies (see `thresholds`).
"""

from __future__ import annotations

import math

import tensorflow as tf

from tff_clipq.quantization import mse_histogram
from tff_clipq.quantization import quantizer

GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
# `exact_mse` of one group evaluates up to this many candidate thresholds one at a time.
_SCALAR_CANDIDATES = 4

RoundingWeight = mse_histogram.RoundingWeight


def exact_mse(
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

  Args:
    magnitudes: |x| as [groups, n] in the compute dtype, non-finite entries as 0.
    finite_count: number of finite entries per group, [groups], in the same dtype.
    threshold: clipping thresholds, [groups] or [candidates, groups], in the same dtype.
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    rounding_weight: factor on the rounding error (1/K): a Python float or a scalar tensor.

  Returns:
    The MSE per threshold, shaped like `threshold`.
  """
  candidates = threshold.shape[0] if threshold.shape.rank == 2 else None
  if magnitudes.shape[0] == 1 and candidates is not None and candidates <= _SCALAR_CANDIDATES:
    # One group: a threshold of one element per evaluation keeps every full-size operation on
    # TensorFlow's scalar fast path; [candidates, 1, 1] against [1, n] takes the general
    # broadcast, about 2.5x slower per entry.
    return tf.stack(
      [
        exact_mse(magnitudes, finite_count, threshold[c], bits, rounding, rounding_weight)
        for c in range(candidates)
      ]
    )
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
  if not mse_histogram.is_unit_weight(rounding_weight):
    rounding_scale = rounding_scale * rounding_weight
  return (clipping_sum + rounding_scale * rounding_sum) / tf.maximum(finite_count, 1.0)


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
    return exact_mse(magnitudes, finite_count, threshold, bits, rounding, rounding_weight)

  def body(iteration, low, high, left, right, left_mse, right_mse, best, best_mse):
    keep_left = left_mse <= right_mse
    low = tf.where(keep_left, low, left)
    high = tf.where(keep_left, right, high)
    width = high - low
    new_point = tf.where(
      keep_left, high - GOLDEN_RATIO_CONJUGATE * width, low + GOLDEN_RATIO_CONJUGATE * width
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
  left = upper - GOLDEN_RATIO_CONJUGATE * width
  right = lower + GOLDEN_RATIO_CONJUGATE * width
  points = tf.concat([tf.stack([left, right]), anchors], axis=0)  # [2 + A, groups]
  errors = mse(points)
  best, best_mse = best_candidate(points, errors)
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


def best_candidate(candidates: tf.Tensor, errors: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(candidate, its error) of least error per group, from [candidates, groups] tensors.

  Args:
    candidates: candidate thresholds, [candidates, groups].
    errors: the error of each candidate, [candidates, groups].

  Returns:
    (best candidate [groups], its error [groups]).
  """
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
    return exact_mse(magnitudes, finite_count, threshold, bits, rounding, rounding_weight)

  # (2 / divisions)^iterations <= g^golden_iterations.
  golden_log_width = golden_iterations * math.log(GOLDEN_RATIO_CONJUGATE)
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
    grid_best, grid_best_mse = best_candidate(candidates, mse(candidates))
    best, best_mse = _keep_better(best, best_mse, grid_best, grid_best_mse)
    return iteration + 1, grid_best - cell, grid_best + cell, best, best_mse

  best, best_mse = best_candidate(anchors, mse(anchors))
  state = (0, lower, upper, best, best_mse)
  if isinstance(iterations, int):  # Unrolled: no per-iteration control-flow overhead.
    for _ in range(iterations):
      state = body(*state)
    return state[3]
  return tf.while_loop(lambda iteration, *_: iteration < iterations, body, state)[3]


def refinement(
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

  Args:
    magnitudes: |x| as [groups, n] in the compute dtype, non-finite entries as 0.
    finite_count: number of finite entries per group, [groups].
    lower: lower end of the search bracket per group, [groups].
    upper: upper end of the search bracket per group, [groups].
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    golden_iterations: resolution: the bracket is narrowed as far as this many golden-section
      steps narrow it.
    anchors: points always evaluated and kept if best, [A, groups] (e.g. fixed point, max |x|).
    rounding_weight: factor on the rounding error (1/K): a Python float or a scalar tensor.

  Returns:
    The best threshold per group, [groups].
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
