"""Tests for `tff_clipq.quantization.mse_histogram`: the binned MSE model and its search."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq.quantization import mse_histogram
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import threshold_search
from tff_clipq.quantization import thresholds


def numpy_mse_sum(
  magnitudes: np.ndarray, threshold: float, bits: int, rounding: str, rounding_weight=1.0
) -> float:
  """Exact (expected, if stochastic) sum of squared errors, from the quantizer's definition.

  The rounding error is multiplied by `rounding_weight` (1/K: the error of the mean of K copies).
  """
  step = 2.0 * threshold / (2**bits - 1)
  position = (np.minimum(magnitudes, threshold) + threshold) / step
  fraction = position - np.floor(position)
  if rounding == 'nearest':
    rounding_error = (step * np.minimum(fraction, 1.0 - fraction)) ** 2
  else:
    rounding_error = step**2 * fraction * (1.0 - fraction)
  return float(
    np.sum(rounding_weight * rounding_error + np.maximum(magnitudes - threshold, 0.0) ** 2)
  )


def magnitudes_of(distribution: str, size: int = 20000, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(size) if distribution == 'gaussian' else rng.laplace(size=size)
  magnitudes = np.abs(x)
  return magnitudes / magnitudes.max()  # As `thresholds` passes them: normalized to max 1.


def histogram_of(magnitudes: np.ndarray, upper: float, finite_count=None):
  finite_count = magnitudes.size if finite_count is None else finite_count
  return mse_histogram.histogram(
    tf.constant(magnitudes[None], tf.float64),
    tf.constant([finite_count], tf.float64),
    tf.constant([upper], tf.float64),
  )


class ModelTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    distribution=('gaussian', 'laplace'),
    rounding=quantizer.ROUNDING_MODES,
    bits=(1, 2, 3, 4),
  )
  def test_model_matches_exact_mse_at_low_bit_widths(self, distribution, rounding, bits):
    magnitudes = magnitudes_of(distribution)
    upper = 0.6
    histogram = histogram_of(magnitudes, upper)
    candidates = np.linspace(0.05, upper, 12)
    modelled = mse_histogram._modelled_squared_error(
      histogram, tf.constant(candidates[:, None], tf.float64), bits, rounding
    ).numpy()[:, 0]
    exact = [numpy_mse_sum(magnitudes, s, bits, rounding) for s in candidates]
    # Bins are 0.4% of a threshold at most here: only the within-bin spread is modelled.
    self.assertAllClose(modelled, exact, rtol=3e-3)

  @parameterized.parameters('nearest', 'stochastic')
  def test_model_tracks_exact_mse_at_high_bit_widths(self, rounding):
    # Bins are wider than a step here: the model averages the rounding error over each bin.
    magnitudes = magnitudes_of('gaussian')
    histogram = histogram_of(magnitudes, 0.9)
    candidates = np.linspace(0.3, 0.9, 7)
    modelled = mse_histogram._modelled_squared_error(
      histogram, tf.constant(candidates[:, None], tf.float64), 8, rounding
    ).numpy()[:, 0]
    exact = [numpy_mse_sum(magnitudes, s, 8, rounding) for s in candidates]
    self.assertAllClose(modelled, exact, rtol=2e-2)

  def test_overflow_bin_is_exact(self):
    magnitudes = magnitudes_of('laplace')
    upper = 0.2
    counts, _, overflow_count, overflow_sum, overflow_square_sum = histogram_of(magnitudes, upper)
    above = magnitudes[magnitudes >= upper]
    self.assertEqual(float(overflow_count[0]), above.size)
    self.assertAllClose(overflow_sum[0], above.sum(), rtol=1e-12)
    self.assertAllClose(overflow_square_sum[0], np.sum(above**2), rtol=1e-12)
    self.assertEqual(float(tf.reduce_sum(counts)) + above.size, magnitudes.size)

  def test_non_finite_entries_are_not_counted(self):
    magnitudes = magnitudes_of('gaussian', size=1000)
    with_gaps = magnitudes.copy()
    with_gaps[[3, 500]] = 0.0  # What `thresholds` passes for non-finite entries.
    kept = np.delete(magnitudes, [3, 500])
    for got, expected in zip(histogram_of(with_gaps, 0.5, 998), histogram_of(kept, 0.5)):
      self.assertAllClose(got, expected, rtol=1e-12)

  def test_zero_upper_gives_finite_results(self):
    histogram = histogram_of(np.zeros(100), 0.0)
    errors = mse_histogram._modelled_squared_error(
      histogram, tf.constant([[0.0], [0.5]], tf.float64), 3, 'nearest'
    )
    self.assertTrue(np.all(np.isfinite(errors.numpy())))


class FixedPointTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    distribution=('gaussian', 'laplace'), rounding=quantizer.ROUNDING_MODES, bits=(1, 2, 4, 8)
  )
  def test_matches_the_iterated_fixed_point(self, distribution, rounding, bits):
    magnitudes = magnitudes_of(distribution)
    coefficient = thresholds.noise_coefficient(bits, rounding)
    counts = mse_histogram.fixed_point_counts(
      tf.constant(magnitudes[None], tf.float64), tf.constant([magnitudes.size], tf.float64)
    )
    found = mse_histogram.fixed_point(counts, coefficient).numpy()[0]
    iterated = thresholds.octav_fixed_point_threshold(
      magnitudes, bits, rounding, tolerance=1e-9
    ).numpy()
    self.assertNear(found, iterated, 1.0 / mse_histogram.FIXED_POINT_BINS)

  def test_constant_and_zero_groups(self):
    magnitudes = tf.constant([[1.0] * 50, [0.0] * 50], tf.float64)
    counts = mse_histogram.fixed_point_counts(magnitudes, tf.constant([50.0, 50.0], tf.float64))
    found = mse_histogram.fixed_point(counts, 0.01).numpy()
    self.assertAllClose(found[0], 1.0)
    self.assertLess(found[1], 1.0 / mse_histogram.FIXED_POINT_BINS)  # Callers clamp to max|x|.


class SearchTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    distribution=('gaussian', 'laplace'),
    rounding=quantizer.ROUNDING_MODES,
    bits=(1, 2, 4, 8),
  )
  def test_search_finds_the_exact_minimum(self, distribution, rounding, bits):
    magnitudes = magnitudes_of(distribution)
    lower, upper = 0.05, 0.9
    found = mse_histogram.histogram_search(
      histogram_of(magnitudes, upper),
      tf.constant([lower], tf.float64),
      tf.constant([upper], tf.float64),
      bits,
      rounding,
      relative_resolution=1e-3,
    ).numpy()[0]
    self.assertBetween(found, lower, upper)
    grid = np.linspace(lower, upper, 2000)
    best = min(numpy_mse_sum(magnitudes, s, bits, rounding) for s in grid)
    self.assertLessEqual(numpy_mse_sum(magnitudes, found, bits, rounding), 1.01 * best)

  def test_groups_are_searched_independently(self):
    wide, narrow = magnitudes_of('gaussian'), 0.3 * magnitudes_of('laplace', seed=1)
    arguments = dict(bits=2, rounding='stochastic', relative_resolution=1e-3)

    def search(magnitudes, lower, upper):
      magnitudes = tf.constant(magnitudes, tf.float64)
      upper = tf.constant(upper, tf.float64)
      return mse_histogram.histogram_search(
        mse_histogram.histogram(magnitudes, tf.reduce_sum(tf.ones_like(magnitudes), -1), upper),
        tf.constant(lower, tf.float64),
        upper,
        **arguments,
      ).numpy()

    both = search(np.stack([wide, narrow]), [0.05, 0.01], [0.9, 0.3])
    self.assertAllClose(
      both, [search(wide[None], [0.05], [0.9])[0], search(narrow[None], [0.01], [0.3])[0]]
    )


class RoundingWeightTest(tf.test.TestCase, parameterized.TestCase):
  """`rounding_weight` (1/K for the mean of K clients' copies) in the model, search, fixed point."""

  @parameterized.product(
    rounding=quantizer.ROUNDING_MODES,
    bits=(1, 2, 3, 4),
    weight=(0.2, 1.0 / 30.0, 'tensor'),
  )
  def test_weighted_model_matches_exact_weighted_mse(self, rounding, bits, weight):
    magnitudes = magnitudes_of('laplace')
    upper = 0.6
    value = 0.2 if weight == 'tensor' else weight
    rounding_weight = tf.constant(value, tf.float64) if weight == 'tensor' else weight
    candidates = np.linspace(0.05, upper, 12)
    modelled = mse_histogram._modelled_squared_error(
      histogram_of(magnitudes, upper),
      tf.constant(candidates[:, None], tf.float64),
      bits,
      rounding,
      rounding_weight,
    ).numpy()[:, 0]
    exact = [numpy_mse_sum(magnitudes, s, bits, rounding, value) for s in candidates]
    self.assertAllClose(modelled, exact, rtol=3e-3)

  def test_unit_weight_changes_nothing(self):
    magnitudes = magnitudes_of('gaussian')
    histogram = histogram_of(magnitudes, 0.6)
    candidates = tf.constant(np.linspace(0.05, 0.6, 12)[:, None], tf.float64)
    for rounding in quantizer.ROUNDING_MODES:
      self.assertAllEqual(
        mse_histogram._modelled_squared_error(histogram, candidates, 2, rounding, 1.0),
        mse_histogram._modelled_squared_error(histogram, candidates, 2, rounding),
      )
      # As a tensor (known only at run time) it is one multiplication by 1: equal to rounding.
      self.assertAllClose(
        mse_histogram._modelled_squared_error(
          histogram, candidates, 2, rounding, tf.constant(1.0, tf.float64)
        ),
        mse_histogram._modelled_squared_error(histogram, candidates, 2, rounding),
        rtol=1e-12,
      )

  @parameterized.product(distribution=('gaussian', 'laplace'), bits=(1, 2, 4), num_clients=(5, 30))
  def test_weighted_search_finds_the_exact_minimum(self, distribution, bits, num_clients):
    magnitudes = magnitudes_of(distribution)
    lower, upper = 0.05, 1.0
    found = mse_histogram.histogram_search(
      histogram_of(magnitudes, upper),
      tf.constant([lower], tf.float64),
      tf.constant([upper], tf.float64),
      bits,
      'stochastic',
      relative_resolution=1e-3,
      rounding_weight=1.0 / num_clients,
    ).numpy()[0]
    grid = np.linspace(lower, upper, 2000)
    mse = lambda s: numpy_mse_sum(magnitudes, s, bits, 'stochastic', 1.0 / num_clients)
    best = min(mse(s) for s in grid)
    self.assertLessEqual(mse(found), 1.01 * best)
    unweighted = mse_histogram.histogram_search(
      histogram_of(magnitudes, upper),
      tf.constant([lower], tf.float64),
      tf.constant([upper], tf.float64),
      bits,
      'stochastic',
      relative_resolution=1e-3,
    ).numpy()[0]
    self.assertGreater(found, unweighted)  # Less rounding noise: less clipping.

  @parameterized.product(
    distribution=('gaussian', 'laplace'), bits=(1, 2, 4, 8), num_clients=(5, 30)
  )
  def test_weighted_fixed_point_matches_the_iterated_one(self, distribution, bits, num_clients):
    magnitudes = magnitudes_of(distribution)
    coefficient = thresholds.noise_coefficient(bits, 'stochastic')
    magnitudes_tensor = tf.constant(magnitudes[None], tf.float64)
    finite_count = tf.constant([magnitudes.size], tf.float64)
    counts = mse_histogram.fixed_point_counts(magnitudes_tensor, finite_count)
    weight = 1.0 / num_clients
    found = mse_histogram.fixed_point(counts, coefficient, weight).numpy()[0]
    as_tensor = mse_histogram.fixed_point(
      counts, coefficient, tf.constant(weight, tf.float64)
    ).numpy()[0]
    folded = mse_histogram.fixed_point(counts, coefficient * weight).numpy()[0]
    self.assertEqual(found, folded)
    self.assertAllClose(as_tensor, found, rtol=1e-12)
    iterated = threshold_search.fixed_point_iteration(
      magnitudes_tensor, finite_count, coefficient, 1000, 1e-9, rounding_weight=weight
    ).numpy()[0]
    self.assertNear(found, iterated, 1.0 / mse_histogram.FIXED_POINT_BINS)


if __name__ == '__main__':
  tf.test.main()
