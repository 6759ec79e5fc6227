"""The search for MSE-optimal clipping thresholds of grouped magnitudes, behind `thresholds`.

Every search starts from the OCTAV fixed point of the noise model (`fixed_point_iteration`, or
`mse_histogram.fixed_point` on a histogram) and refines it on [s/2, min(2s, max|x|)], keeping the
threshold of least exact MSE among the refined point, the fixed point and max|x|: never worse
than either. The magnitudes are first divided by max|x| (`normalized_magnitudes`), so squared
errors neither underflow nor overflow and thresholds scale with the data. How the refinement
runs depends on which cost dominates at each size:

  * groups of at least `HISTOGRAM_MIN_ENTRIES` entries (static shape): one histogram of |x|
    gives both the fixed point and a model of the MSE (`mse_histogram`), which a grid search
    minimizes, one pass over the data instead of one per search step; the minimizer is then
    compared with the fixed point and max|x| on the exact MSE;
  * smaller groups: golden-section or grid search of the exact MSE (`exact_mse.refinement`);
  * many tensors at once (`batched_thresholds`): a search costs a few hundred small operations
    whatever its size, so tensors with fewer than `_BATCH_MAX_ENTRIES` entries per group are
    padded to a common length and searched as one block, and all blocks large enough for the
    histogram search share one.

Inputs are the rows of `thresholds._grouped_magnitudes`: |x| as [groups, n] in the compute dtype,
non-finite entries as 0 and left out through the finite count per group. `coefficient` is the
noise coefficient c of `thresholds.noise_coefficient`, and `rounding_weight` (1/K) weights the
rounding error for the error of the mean of K copies.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from tff_clipq.quantization import exact_mse
from tff_clipq.quantization import mse_histogram

_UNROLLED_FIXED_POINT_UPDATES = 3
# Groups this large (static shape) are refined on the histogram model (`mse_histogram`): one pass
# over the data and a search on 256 bins beat a dozen exact passes (one CPU thread, the CNN's
# 40,000-entry kernel: about 1.1 -> 0.7 ms). Smaller groups search the exact MSE.
HISTOGRAM_MIN_ENTRIES = 1024
# `batched_thresholds` searches tensors with fewer entries per group than this as one batch:
# their searches cost per-operation overhead rather than arithmetic.
_BATCH_MAX_ENTRIES = 8192

RoundingWeight = mse_histogram.RoundingWeight


def largest_magnitude(magnitudes: tf.Tensor) -> tf.Tensor:
  """max |x| per group [groups]; 0 for an empty group (whose reduce_max would be -inf)."""
  return tf.maximum(tf.reduce_max(magnitudes, axis=-1), 0.0)


def normalized_magnitudes(magnitudes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(|x| / max|x|, max|x|, max of |x| / max|x|) per group; the last is 1, or 0 if all zero.

  The threshold search runs on values in [0, 1] and its result is scaled back, so squared errors
  neither underflow (tiny tensors) nor overflow (huge ones) and thresholds scale with the data.
  """
  scale = largest_magnitude(magnitudes)
  largest = tf.cast(scale > 0.0, scale.dtype)  # x / x = 1 exactly.
  return tf.math.divide_no_nan(magnitudes, scale[:, None]), scale, largest


def fixed_point_iteration(
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

  Args:
    magnitudes: |x| as [groups, n] in the compute dtype, non-finite entries as 0.
    finite_count: number of finite entries per group, [groups].
    coefficient: noise coefficient c of `thresholds.noise_coefficient`.
    max_iterations: limit on the iteration count; the loop stops there even if not converged.
    tolerance: stop once every group's threshold changes by at most this fraction of itself.
    rounding_weight: factor on `coefficient` (1/K): a Python float or a scalar tensor.
  """
  if not mse_histogram.is_unit_weight(rounding_weight):
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
  _, threshold, _ = tf.while_loop(not_converged, body, (tf.constant(unrolled), threshold, previous))
  return threshold


def optimal_grouped_thresholds(
  magnitudes: tf.Tensor,
  finite_count: tf.Tensor,
  bits: int,
  rounding: str,
  coefficient: float,
  max_iterations: int = 100,
  tolerance: float = 1e-2,
  refinement_iterations: int = 11,
  rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """`thresholds.optimal_clipping_threshold` of each row of grouped magnitudes: [groups].

  Args:
    magnitudes: |x| as [groups, n] in the compute dtype, non-finite entries as 0.
    finite_count: number of finite entries per group, [groups].
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    coefficient: `thresholds.noise_coefficient(bits, rounding)`.
    max_iterations: iteration limit of `fixed_point_iteration` (unused for groups searched on
      histograms).
    tolerance: relative convergence tolerance of `fixed_point_iteration` (likewise unused there).
    refinement_iterations: resolution of the refinement, in golden-section steps.
    rounding_weight: 1/K for the mean of K copies (`thresholds._rounding_weight`), in the
      magnitudes' dtype.
  """
  if _searched_on_histograms(magnitudes):
    return _histogram_thresholds(
      [(magnitudes, finite_count)],
      bits,
      rounding,
      coefficient,
      refinement_iterations,
      rounding_weight,
    )[0]
  magnitudes, scale, largest = normalized_magnitudes(magnitudes)
  fixed_point = tf.minimum(
    fixed_point_iteration(
      magnitudes, finite_count, coefficient, max_iterations, tolerance, rounding_weight
    ),
    largest,
  )
  lower, upper = 0.5 * fixed_point, tf.minimum(2.0 * fixed_point, largest)
  anchors = tf.stack([fixed_point, largest], axis=0)  # [2, groups]
  threshold = exact_mse.refinement(
    magnitudes,
    finite_count,
    lower,
    upper,
    bits,
    rounding,
    refinement_iterations,
    anchors,
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
  coefficient: float,
  refinement_iterations: int = 11,
  rounding_weight: RoundingWeight = 1.0,
) -> list[tf.Tensor]:
  """`optimal_grouped_thresholds` of blocks of groups: (magnitudes [groups, n], finite_count).

  `rounding_weight` (1/K, the blocks' dtype) weights the rounding error everywhere.

  Per block, one histogram pass for the fixed point, one for the MSE model and one exact
  comparison read the entries; the fixed point and the model search, whose cost is a few
  hundred small operations whatever the block's size, run once on all blocks' histograms.
  """
  normalized = [(normalized_magnitudes(m), f) for m, f in blocks]
  sizes = [m.shape[0] for (m, _, _), _ in normalized]
  largest = tf.concat([largest for (_, _, largest), _ in normalized], axis=0)
  counts = tf.concat([mse_histogram.fixed_point_counts(m, f) for (m, _, _), f in normalized], 0)
  fixed_point = tf.minimum(mse_histogram.fixed_point(counts, coefficient, rounding_weight), largest)
  lower, upper = 0.5 * fixed_point, tf.minimum(2.0 * fixed_point, largest)
  histograms = [
    mse_histogram.histogram(m, f, block_upper)
    for ((m, _, _), f), block_upper in zip(normalized, tf.split(upper, sizes))
  ]
  modelled_best = mse_histogram.histogram_search(
    tuple(tf.concat(parts, axis=0) for parts in zip(*histograms)),
    lower,
    upper,
    bits,
    rounding,
    relative_resolution=exact_mse.GOLDEN_RATIO_CONJUGATE**refinement_iterations,
    rounding_weight=rounding_weight,
  )
  candidates = tf.stack([fixed_point, largest, modelled_best], axis=0)  # [3, groups]
  thresholds = []
  for ((m, scale, _), f), block_candidates in zip(normalized, tf.split(candidates, sizes, axis=1)):
    errors = exact_mse.exact_mse(m, f, block_candidates, bits, rounding, rounding_weight)
    thresholds.append(exact_mse.best_candidate(block_candidates, errors)[0] * scale)
  return thresholds


def batched_thresholds(
  grouped: Sequence[tuple[tf.Tensor, tf.Tensor]],
  bits: int,
  rounding: str,
  coefficient: float,
  rounding_weight: Callable[[tf.DType], RoundingWeight],
) -> list[tf.Tensor]:
  """`optimal_grouped_thresholds` of each (magnitudes [groups, n], finite_count), searched together.

  Tensors with fully defined shapes and fewer than `_BATCH_MAX_ENTRIES` entries per group are
  padded with zeros outside their finite counts (ignored, like non-finite entries) to a common
  length and searched as the groups of one block; larger tensors are blocks of their own. Blocks
  of at least `HISTOGRAM_MIN_ENTRIES` entries per group (and of the first such block's dtype)
  then share one histogram search (`_histogram_thresholds`); the others are searched one by one.

  Args:
    grouped: one (magnitudes [groups, n], finite_count [groups]) pair per tensor, as returned by
      `thresholds._grouped_magnitudes`.
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    coefficient: `thresholds.noise_coefficient(bits, rounding)`.
    rounding_weight: function of a dtype returning 1/K in that dtype.

  Returns:
    Thresholds [groups] per input, in order.
  """
  batched = [
    i
    for i, (magnitudes, _) in enumerate(grouped)
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
    blocks.append(
      (
        batched,
        tf.concat([pad(grouped[i][0]) for i in batched], axis=0),
        tf.concat([grouped[i][1] for i in batched], axis=0),
      )
    )
  eligible = [k for k, block in enumerate(blocks) if _searched_on_histograms(block[1])]
  shared = [k for k in eligible if blocks[k][1].dtype == blocks[eligible[0]][1].dtype]
  block_thresholds = [None] * len(blocks)
  if shared:
    searched = _histogram_thresholds(
      [blocks[k][1:] for k in shared],
      bits,
      rounding,
      coefficient,
      rounding_weight=rounding_weight(blocks[shared[0]][1].dtype),
    )
    for k, found in zip(shared, searched):
      block_thresholds[k] = found
  thresholds = [None] * len(grouped)
  for (indices, magnitudes, finite_count), found in zip(blocks, block_thresholds):
    if found is None:
      found = optimal_grouped_thresholds(
        magnitudes,
        finite_count,
        bits,
        rounding,
        coefficient,
        rounding_weight=rounding_weight(magnitudes.dtype),
      )
    groups = [grouped[i][0].shape[0] for i in indices]
    for i, part in zip(indices, tf.split(found, groups) if len(indices) > 1 else [found]):
      thresholds[i] = part
  return thresholds
