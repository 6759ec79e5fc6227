"""The quantizer's MSE as a function of the threshold, modelled from one histogram of |x|.

Evaluating the exact MSE (`thresholds.expected_quantization_mse`) at a candidate threshold takes a
pass over every entry, and a search needs a dozen. For large tensors this module reads the entries
once instead: it counts the magnitudes in `num_bins` equal bins of [0, upper) and keeps the exact
count, sum |x| and sum x^2 of the entries >= upper (always clipped, for thresholds <= upper). For
any threshold s <= upper the MSE then follows from the histogram alone, the entries of a bin taken
as spread uniformly over it:

  * inside [0, s] an entry at magnitude u has rounding error step^2 phi(u / step + (2^B - 1) / 2),
    phi(t) = (t - round(t))^2 (nearest) or f (1 - f), f = t - floor(t) (stochastic): 1-periodic,
    with a closed-form antiderivative Phi (a linear term plus a cubic in the fractional part);
  * above s the error is (u - s)^2, with antiderivative (u - s)^3 / 3.

A bin [e_k, e_k+1) of n_k entries then contributes (n_k / width) (F(e_k+1) - F(e_k)), F the sum
of both antiderivatives, and regrouping the sum by edges evaluates F once per edge.

Bins are under 1% of the threshold wide, so this is within 1e-3 of the exact MSE at low bit
widths, and close to the exact average of phi where bins are wider than a step (high bit widths).
`threshold_search` searches this model, then compares its minimizer with the fixed point and
max |x| on the exact MSE. `fixed_point` solves the OCTAV fixed-point equation that centres the
search on a histogram too (one pass instead of one per iteration).

`rounding_weight` (default 1) multiplies the rounding term of the model and the noise coefficient
of the fixed point: 1/K models the error of the mean of K stochastically rounded copies, whose
independent rounding noise averages out while their clipping error does not (see `thresholds`).
"""

from __future__ import annotations

import math
from typing import Union

import tensorflow as tf

from tff_clipq.quantization import quantizer

NUM_BINS = 256  # Bin width upper / 256: under 1% of a threshold in the search bracket.
FIXED_POINT_BINS = 256  # Bins over [0, max|x|] for the fixed point, which only centres the search.
# Candidates per grid iteration, which narrows the bracket 6.5x. Three iterations on [12, groups,
# bins] tensors cost less than two on [32, ...] for the same resolution (the CNN's update: about
# 0.06 ms less per encode) and than four on [8, ...].
_GRID_POINTS = 12


def _bin_counts(
  magnitudes: tf.Tensor, finite_count: tf.Tensor, upper: tf.Tensor, num_bins: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(finite entries per bin [groups, num_bins + 1], bin index [groups, n], bin width [groups]).

  Bins j < num_bins cover [j, j + 1) x width of [0, upper); bin num_bins holds u >= upper.
  `magnitudes` [groups, n] (non-finite entries are 0), `finite_count` [groups] the number of
  finite entries per group, `upper` [groups] >= 0.
  Counting is one cheap `bincount`; per-bin sums would need a scatter-add, 10x slower on CPU.
  """
  # A zero `upper` (all magnitudes zero) gets unit width: every entry then lands in bin 0.
  width = tf.where(upper > 0.0, upper / float(num_bins), tf.ones_like(upper))
  # The minimum comes before the cast, so huge ratios (tiny widths) cannot overflow the integer.
  index = tf.cast(tf.minimum(magnitudes * (1.0 / width)[:, None], float(num_bins)), tf.int32)
  # Each row counted on its own; every index is in range by construction.
  counts = tf.raw_ops.DenseBincount(
    input=index, size=num_bins + 1, weights=tf.zeros([0], magnitudes.dtype)
  )
  # Non-finite entries have magnitude 0, hence index 0: they are taken out of bin 0.
  nonfinite = tf.cast(tf.shape(magnitudes)[1], magnitudes.dtype) - finite_count
  return counts - tf.pad(nonfinite[:, None], [[0, 0], [0, num_bins]]), index, width


Histogram = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]
# A Python float, or a scalar tensor of the histogram's dtype (known only at run time).
RoundingWeight = Union[float, tf.Tensor]


def is_unit_weight(rounding_weight: RoundingWeight) -> bool:
  """Whether `rounding_weight` is the Python constant 1 (then no operation is spent on it)."""
  return not tf.is_tensor(rounding_weight) and rounding_weight == 1.0


def histogram(
  magnitudes: tf.Tensor, finite_count: tf.Tensor, upper: tf.Tensor, num_bins: int = NUM_BINS
) -> Histogram:
  """Finite entries per bin of [0, upper) [groups, num_bins], and the overflow bin's moments.

  Returns (counts, bin width [groups], overflow count, sum u, sum u^2 over u >= upper [groups]).
  Every part is indexed by group first, so histograms of several blocks of groups concatenate.

  Args:
    magnitudes: |x| as [groups, n], non-finite entries as 0.
    finite_count: number of finite entries per group, [groups].
    upper: end of the binned range [0, upper) per group, [groups], >= 0.
    num_bins: number of equal bins of [0, upper).
  """
  counts, _, width = _bin_counts(magnitudes, finite_count, upper, num_bins)
  overflow_count = counts[:, num_bins]
  # The overflow's moments from its excess over `upper`, v = max(u - upper, 0): sum u =
  # sum v + upper K and sum u^2 = sum v^2 + 2 upper sum v + upper^2 K for its K entries (all
  # terms positive). No per-entry select; an entry that rounding puts on the other side of
  # `upper` from its bin changes them by a float rounding error only.
  excess = tf.nn.relu(magnitudes - upper[:, None])
  excess_sum = tf.reduce_sum(excess, axis=-1)
  excess_square_sum = tf.reduce_sum(tf.square(excess), axis=-1)
  return (
    counts[:, :num_bins],
    width,
    overflow_count,
    excess_sum + upper * overflow_count,
    excess_square_sum + upper * (2.0 * excess_sum + upper * overflow_count),
  )


# Phi (below) times this factor has small integer coefficients, which saves an operation per
# entry of the search's largest tensors; the model divides it out once per candidate.
_ANTIDERIVATIVE_SCALE = {'nearest': 12.0, 'stochastic': 6.0}


def _scaled_rounding_antiderivative(position: tf.Tensor, rounding: str) -> tf.Tensor:
  """_ANTIDERIVATIVE_SCALE x Phi(t), Phi(t) = integral_0^t phi up to a constant.

  Phi is the rounding error in step^2 units integrated along code positions; the constant, the
  same for every t, cancels wherever Phi is differenced. Nearest: phi(t) = (t - round(t))^2, mean
  1/12, Phi = round(t) / 12 + g^3 / 3 with g = t - round(t). Stochastic: phi = f (1 - f),
  f = t - floor(t), mean 1/6, Phi = floor(t) / 6 + f^2 / 2 - f^3 / 3.
  """
  if rounding == 'nearest':
    nearest = tf.round(position)
    offset = position - nearest
    return nearest + 4.0 * tf.square(offset) * offset
  whole = tf.floor(position)
  fraction = position - whole
  return whole + tf.square(fraction) * (3.0 - 2.0 * fraction)


def _modelled_squared_error(
  histogram: Histogram,
  thresholds: tf.Tensor,
  bits: int,
  rounding: str,
  rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """Modelled sum of squared errors [candidates, groups] at `thresholds` [candidates, groups].

  The rounding part is multiplied by `rounding_weight` (1/K: the error of the mean of K copies).

  Each bin [e_k, e_k+1) holds its n_k entries uniformly spread, so it contributes
  (n_k / width) (F(e_k+1) - F(e_k)) with F(e) = step^3 Phi(t(min(e, s))) + max(e - s, 0)^3 / 3,
  the antiderivative of rounding error below s plus clipping error above. Summed over bins this
  is (1 / width) sum_k F(e_k) (n_k-1 - n_k): one evaluation of F per edge, not two per bin.
  """
  counts, width, overflow_count, overflow_sum, overflow_square_sum = histogram
  num_bins = counts.shape[-1]
  half_max_code = 0.5 * float(quantizer.num_levels(bits) - 1)
  dtype = counts.dtype
  edges = tf.range(num_bins + 1, dtype=dtype) * width[:, None]  # [groups, bins + 1]
  # n_k-1 - n_k at edge k (no entries below edge 0 or above the last edge).
  edge_weights = tf.pad(counts, [[0, 0], [1, 0]]) - tf.pad(counts, [[0, 0], [0, 1]])
  s = thresholds[..., None]  # [candidates, groups, 1]
  codes_per_unit = tf.math.divide_no_nan(tf.constant(half_max_code, dtype), s)
  # Code position of min(e, s): that of e, capped at s's position 2^B - 1.
  position = tf.minimum(edges * codes_per_unit + half_max_code, 2.0 * half_max_code)
  rounding_sum = tf.reduce_sum(
    _scaled_rounding_antiderivative(position, rounding) * edge_weights, axis=-1
  )
  above = tf.maximum(edges - s, 0.0)
  clipping_sum = tf.reduce_sum(tf.square(above) * above * edge_weights, axis=-1)
  step = thresholds / half_max_code
  if is_unit_weight(rounding_weight):
    rounding_part = tf.square(step) * step * rounding_sum / _ANTIDERIVATIVE_SCALE[rounding]
  else:  # One scalar factor: the weight folded into the antiderivative's scale.
    rounding_part = (
      tf.square(step) * step * rounding_sum * (rounding_weight / _ANTIDERIVATIVE_SCALE[rounding])
    )
  binned = (rounding_part + clipping_sum / 3.0) / width
  overflow = (
    overflow_square_sum - 2.0 * thresholds * overflow_sum + overflow_count * tf.square(thresholds)
  )
  return binned + overflow


def histogram_search(
  histogram: Histogram,
  lower: tf.Tensor,
  upper: tf.Tensor,
  bits: int,
  rounding: str,
  relative_resolution: float,
  rounding_weight: RoundingWeight = 1.0,
) -> tf.Tensor:
  """The minimizer of the modelled MSE on [lower, upper] per group, by repeated grid search.

  `rounding_weight` multiplies the modelled rounding error (`_modelled_squared_error`).

  `histogram` is `histogram(magnitudes, finite_count, upper)`'s (or several concatenated); the
  search only touches [candidates, groups, bins] tensors. Each grid iteration evaluates
  `_GRID_POINTS` evenly spaced interior points and keeps the two cells around the best, until the
  bracket is narrower than `relative_resolution` of its starting width.

  Args:
    histogram: a `Histogram` from `histogram`, or several concatenated along the groups.
    lower: lower end of the search bracket per group, [groups].
    upper: upper end of the search bracket per group, [groups], at most the histogram's `upper`.
    bits: bits per code, 1..16.
    rounding: 'nearest' or 'stochastic'.
    relative_resolution: final bracket width as a fraction of the starting width, in (0, 1).
    rounding_weight: factor on the modelled rounding error (1/K): a Python float or a scalar
      tensor.

  Returns:
    The modelled minimizer per group, [groups].
  """
  dtype = histogram[0].dtype
  divisions = _GRID_POINTS + 1
  iterations = max(1, math.ceil(math.log(relative_resolution) / math.log(2.0 / divisions)))
  fractions = tf.range(1, divisions, dtype=dtype)[:, None] / float(divisions)  # [points, 1]
  low, high = lower, upper
  for _ in range(iterations):  # At least one, so `best` is always set.
    candidates = low + fractions * (high - low)  # [points, groups]
    errors = _modelled_squared_error(histogram, candidates, bits, rounding, rounding_weight)
    best = tf.gather(tf.transpose(candidates), tf.argmin(errors, axis=0), batch_dims=1)
    cell = (high - low) / float(divisions)
    low, high = tf.maximum(best - cell, lower), tf.minimum(best + cell, upper)
  return best


def fixed_point_counts(
  magnitudes: tf.Tensor, finite_count: tf.Tensor, num_bins: int = FIXED_POINT_BINS
) -> tf.Tensor:
  """Finite entries of `magnitudes` [groups, n] (normalized to [0, 1]) per bin, [groups, bins + 1].

  Bins of [0, 1), plus a last one for u = 1 (the maximum), whose entries are exactly at 1.

  Args:
    magnitudes: |x| / max |x| as [groups, n], non-finite entries as 0.
    finite_count: number of finite entries per group, [groups].
    num_bins: number of equal bins of [0, 1).
  """
  ones = tf.ones([tf.shape(magnitudes)[0]], magnitudes.dtype)
  return _bin_counts(magnitudes, finite_count, ones, num_bins)[0]


def fixed_point(
  counts: tf.Tensor, coefficient: float, rounding_weight: RoundingWeight = 1.0
) -> tf.Tensor:
  """The OCTAV fixed point s = E[|x| 1{|x|>=s}] / (c P(|x|<s) + P(|x|>=s)) per group, from
  `fixed_point_counts` (of one block of groups, or several concatenated).

  The noise coefficient used is c = `coefficient` x `rounding_weight` (1/K for the mean of K).

  The right-hand side T(s) is evaluated at every bin edge at once (suffix sums of the counts and
  of count x bin centre), and s is where T(s) - s first turns non-positive, interpolated linearly
  within that bin: iterating s <- T(s) needs one pass over the data per step (4-12 steps to 1%),
  this one pass in all. Bins are 1/256 of max|x| wide, so s is within a bin's width of the
  exact fixed point, well inside the search bracket [s/2, 2s] it centres. (All-zero groups get
  a value below one bin width: callers clamp to max |x|.)

  Args:
    counts: `fixed_point_counts` output, [groups, bins + 1].
    coefficient: noise coefficient c of `thresholds.noise_coefficient`.
    rounding_weight: factor on `coefficient` (1/K): a Python float or a scalar tensor.

  Returns:
    The fixed point per group, [groups], in units of max |x|.
  """
  dtype = counts.dtype
  if not is_unit_weight(rounding_weight):
    coefficient = coefficient * rounding_weight
  num_bins = counts.shape[-1] - 1
  centres = tf.concat([(tf.range(num_bins, dtype=dtype) + 0.5) / float(num_bins), [1.0]], axis=0)
  total = tf.reduce_sum(counts, axis=-1, keepdims=True)
  # Tail count and mass from each left edge j / num_bins up: [groups, bins].
  tail_count = tf.math.cumsum(counts, axis=-1, reverse=True)
  tail_mass = tf.math.cumsum(counts * centres, axis=-1, reverse=True)
  edges = tf.range(num_bins + 1, dtype=dtype) / float(num_bins)
  excess = tf.math.divide_no_nan(tail_mass, coefficient * (total - tail_count) + tail_count) - edges
  # excess > 0 at edge 0 (T(0) = E|x|) unless the group is all zero, and <= 0 at edge 1
  # (T(1) = K / (c (N - K) + K) for the K entries at the maximum).
  first = tf.argmax(tf.cast(excess <= 0.0, tf.int32), axis=-1, output_type=tf.int32)
  before = tf.maximum(first - 1, 0)
  excess_before = tf.gather(excess, before, batch_dims=1)
  excess_at = tf.gather(excess, first, batch_dims=1)
  fraction = tf.math.divide_no_nan(excess_before, excess_before - excess_at)
  return (tf.cast(before, dtype) + tf.clip_by_value(fraction, 0.0, 1.0)) / float(num_bins)
