"""Tests for `tff_clipq.quantization.quantizer`: codes, levels, rounding, dtypes, errors."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq import quantization
from tff_clipq.quantization import quantizer

ALL_BITS = tuple(range(1, 17))
FLOAT_DTYPES = (tf.float16, tf.float32, tf.float64)


def _step(threshold: float, bits: int) -> float:
  return 2.0 * threshold / (2**bits - 1)


class CodesAndLevelsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(*ALL_BITS)
  def test_codes_are_int32_within_range(self, bits):
    x = np.random.default_rng(bits).normal(scale=2.0, size=2000).astype(np.float32)
    for rounding in quantization.ROUNDING_MODES:
      with self.subTest(rounding=rounding):
        codes = quantization.quantize(x, bits, 1.5, rounding, seed=[bits, 0]).codes
        self.assertEqual(codes.dtype, tf.int32)
        self.assertEqual(codes.shape, x.shape)
        codes = codes.numpy()
        # The data reach beyond +-1.5, so both end codes must be used.
        self.assertEqual(codes.min(), 0)
        self.assertEqual(codes.max(), 2**bits - 1)

  @parameterized.product(dtype=FLOAT_DTYPES, graph=(False, True))
  def test_outermost_levels_are_exactly_the_threshold(self, dtype, graph):
    # Float16 tensors are processed in float32, so +-s itself may not be a float16 value.
    ends = [-5e4, 5e4] if dtype == tf.float16 else [-5e4, -1.0, 1.0, 5e4]
    compute_dtype = tf.float64 if dtype == tf.float64 else tf.float32

    def round_trip(x, threshold, bits):
      quantized = quantization.quantize(x, bits, threshold)
      return quantized.codes, quantization.dequantize(quantized)

    if graph:  # Graph optimizations must not perturb the end levels either.
      round_trip = tf.function(round_trip)
    for bits in ALL_BITS:
      for threshold in (1.0 / 3.0, 0.1, 1.3, 3.7, 1e-3, 1234.5678, 0.7071067811865476):
        with self.subTest(bits=bits, threshold=threshold):
          threshold_tensor = tf.constant(threshold, compute_dtype)
          signs = np.sign(ends)
          x = tf.cast(np.where(np.abs(ends) == 1.0, signs * threshold, ends), dtype)
          codes, restored = round_trip(x, threshold_tensor, bits)
          self.assertAllEqual(codes, np.where(signs > 0, 2**bits - 1, 0))
          expected = tf.cast(threshold_tensor, dtype).numpy()
          self.assertAllEqual(restored, signs * expected)

  def test_level_set_is_symmetric(self):
    for bits in ALL_BITS:
      codes = tf.range(2**bits, dtype=tf.int32)
      levels = quantization.dequantize_codes(codes, 0.37, bits, tf.float32).numpy()
      self.assertAllEqual(levels, -levels[::-1])
      self.assertAllClose(np.diff(levels), np.full(2**bits - 1, _step(0.37, bits)), rtol=1e-4)

  @parameterized.product(dtype=FLOAT_DTYPES, shape=((), (7,), (3, 4, 5)))
  def test_dequantize_keeps_shape_and_dtype(self, dtype, shape):
    x = tf.cast(np.random.default_rng(0).normal(size=shape), dtype)
    for rounding in quantization.ROUNDING_MODES:
      with self.subTest(rounding=rounding):
        quantized = quantization.quantize(x, 4, 1.0, rounding)
        self.assertEqual(quantized.dtype, dtype)
        restored = quantization.dequantize(quantized)
        self.assertEqual(restored.dtype, dtype)
        self.assertEqual(restored.shape, x.shape)
        self.assertAllClose(restored, tf.clip_by_value(x, -1.0, 1.0), atol=_step(1.0, 4) + 1e-3)


class RoundingTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(1, 2, 3, 4, 8, 12, 16)
  def test_nearest_rounding_error_is_at_most_half_a_step(self, bits):
    threshold = 1.7
    x = np.random.default_rng(bits).uniform(-threshold, threshold, size=20000)
    error = quantization.fake_quantize(x, bits, threshold).numpy() - x
    self.assertLessEqual(np.max(np.abs(error)), 0.5 * _step(threshold, bits) * (1 + 1e-9))

  @parameterized.parameters(*ALL_BITS)
  def test_values_outside_the_range_come_out_at_the_threshold(self, bits):
    threshold = 0.83
    x = tf.constant([-np.inf, -1e6, -0.84, 0.84, 3.0, 1e6, np.inf] * 2000, tf.float32)
    expected = np.where(x.numpy() > 0, 1.0, -1.0) * np.float32(threshold)
    for rounding in quantization.ROUNDING_MODES:
      with self.subTest(rounding=rounding):
        restored = quantization.fake_quantize(x, bits, threshold, rounding, seed=[7, bits])
        self.assertAllEqual(restored, expected)

  @parameterized.parameters(1, 2, 3, 8)
  def test_stochastic_rounding_is_unbiased_inside_the_range(self, bits):
    threshold = 1.3
    step = _step(threshold, bits)
    values = np.array([-1.3, -1.0, -0.37, 0.0, 0.1234, 0.5, 0.99, 1.29, 1.3, 2.0, -5.0])
    repetitions_per_seed, seeds = 5000, 4
    samples = np.concatenate(
      [
        quantization.fake_quantize(
          np.tile(values, (repetitions_per_seed, 1)), bits, threshold, 'stochastic', seed=[s, 1]
        ).numpy()
        for s in range(seeds)
      ]
    )
    clipped = np.clip(values, -threshold, threshold)
    position = (clipped + threshold) / step
    fraction = position - np.floor(position)
    fraction = np.where(fraction > 1 - 1e-9, 0.0, fraction)  # Exactly on a level.
    variance = step**2 * fraction * (1 - fraction)
    standard_error = np.sqrt(variance / samples.shape[0])
    bias = samples.mean(axis=0) - clipped
    self.assertAllLessEqual(np.abs(bias) - 5 * standard_error, 1e-12)
    # Every sample is one of the two neighbouring levels, with the variance of that coin flip.
    lower = -threshold + np.floor(position + 1e-9) * step
    on_neighbour = np.isclose(samples, lower, atol=1e-9)
    on_neighbour |= np.isclose(samples, lower + step, atol=1e-9)
    self.assertTrue(np.all(on_neighbour))
    random_columns = fraction * (1 - fraction) > 0.05
    self.assertAllClose(samples.var(axis=0)[random_columns], variance[random_columns], rtol=0.1)

  def test_seeded_stochastic_rounding_is_reproducible(self):
    x = np.random.default_rng(0).normal(size=(100, 10)).astype(np.float32)
    codes = lambda seed: quantization.quantize(x, 3, 1.0, 'stochastic', seed=seed).codes.numpy()
    self.assertAllEqual(codes([1, 2]), codes([1, 2]))
    self.assertAllEqual(codes(tf.constant([1, 2], tf.int64)), codes([1, 2]))
    self.assertGreater(np.mean(codes([1, 2]) != codes([1, 3])), 0.1)
    self.assertGreater(np.mean(codes([1, 2]) != codes([2, 2])), 0.1)

    @tf.function
    def graph_codes(values, seed):
      return quantization.quantize(values, 3, 1.0, 'stochastic', seed=seed).codes

    self.assertAllEqual(graph_codes(x, tf.constant([1, 2])), codes([1, 2]))

  @parameterized.parameters((tf.float32, 40_001), (tf.float64, 6), (tf.float32, 0))
  def test_rounding_noise_is_uniform_on_16_bit_midpoints(self, dtype, size):
    noise = quantizer._uniform_noise(tf.constant([size]), dtype, [3, 4]).numpy()
    self.assertEqual(noise.shape, (size,))
    self.assertEqual(noise.dtype, dtype.as_numpy_dtype)
    if not size:
      return
    steps = noise * 2**quantizer.NOISE_BITS - 0.5  # k in (k + 1/2) / 2^16.
    self.assertAllEqual(steps, np.round(steps))
    self.assertAllInRange(steps, 0, 2**quantizer.NOISE_BITS - 1)
    if size > 1000:
      # Both 16-bit halves of each generator word are uniform: chi-square over 64 buckets
      # (63 degrees of freedom; 120 is far beyond its 99.99th percentile) and a mean of 1/2.
      counts = np.bincount((noise * 64).astype(int), minlength=64)
      expected = size / 64
      self.assertLess(np.sum((counts - expected) ** 2 / expected), 120)
      self.assertAllClose(noise.mean(), 0.5, atol=5 / np.sqrt(12 * size))
      # Neighbours (the two halves of one word, and adjacent words) are uncorrelated.
      self.assertLess(abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]), 5 / np.sqrt(size))

  def test_unseeded_stochastic_rounding_varies(self):
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    first = quantization.quantize(x, 3, 1.0, 'stochastic').codes
    second = quantization.quantize(x, 3, 1.0, 'stochastic').codes
    self.assertGreater(np.mean(first.numpy() != second.numpy()), 0.1)


class PerChannelAndSpecialValuesTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(((50, 4),), ((2, 5, 4),))
  def test_per_channel_threshold_matches_per_tensor_quantization(self, shape):
    x = np.random.default_rng(1).normal(scale=2.0, size=shape).astype(np.float32)
    thresholds = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    for rounding in quantization.ROUNDING_MODES:
      with self.subTest(rounding=rounding):
        quantized = quantization.quantize(x, 3, thresholds, rounding, seed=[3, 4])
        self.assertEqual(quantized.codes.shape, x.shape)
        restored = quantization.dequantize(quantized).numpy()
        self.assertTrue(np.all(np.abs(restored) <= thresholds * (1 + 1e-6)))
        if rounding == 'nearest':
          for channel, threshold in enumerate(thresholds):
            alone = quantization.fake_quantize(x[..., channel], 3, threshold)
            self.assertAllEqual(restored[..., channel], alone)

  @parameterized.parameters(1, 2, 7, 16)
  def test_zero_threshold_dequantizes_to_zeros(self, bits):
    for x in (np.zeros(10, np.float32), np.array([1.0, -2.0, 0.5], np.float32)):
      for rounding in quantization.ROUNDING_MODES:
        with self.subTest(x=x, rounding=rounding):
          restored = quantization.fake_quantize(x, bits, 0.0, rounding)
          self.assertAllEqual(restored, np.zeros_like(x))

  def test_nan_and_inf_entries_give_finite_levels(self):
    x = tf.constant([np.nan, np.inf, -np.inf, 0.3, np.nan], tf.float32)
    for bits in (1, 2, 8):
      for rounding in quantization.ROUNDING_MODES:
        with self.subTest(bits=bits, rounding=rounding):
          restored = quantization.fake_quantize(x, bits, 1.0, rounding).numpy()
          self.assertTrue(np.all(np.isfinite(restored)))
          self.assertAllEqual(restored[1:3], [1.0, -1.0])
          # NaN goes to a level closest to zero.
          half_step = 0.5 * _step(1.0, bits) * (1 + 1e-6)
          self.assertAllLessEqual(np.abs(restored[[0, 4]]), half_step)

  def test_empty_tensor(self):
    restored = quantization.fake_quantize(tf.zeros([0, 3]), 4, [1.0, 2.0, 3.0])
    self.assertEqual(restored.shape, [0, 3])


class MeasureTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(rounding=quantization.ROUNDING_MODES, per_channel=(False, True))
  def test_all_finite_promise_changes_nothing_for_finite_input(self, rounding, per_channel):
    x = np.random.default_rng(6).normal(size=(50, 4)).astype(np.float32)
    threshold = [0.8, 1.0, 1.2, 1.5] if per_channel else 1.1
    measure = lambda all_finite: quantizer.quantize_and_measure(
      x, 3, threshold, rounding, seed=[1, 2], all_finite=all_finite
    )
    (promised, *promised_stats), (checked, *checked_stats) = measure(True), measure(False)
    self.assertAllEqual(promised.codes, checked.codes)
    self.assertAllClose(promised_stats, checked_stats, rtol=1e-6)

  @parameterized.product(
    rounding=quantization.ROUNDING_MODES, bits=(1, 2, 4, 8), per_channel=(False, True)
  )
  def test_measured_error_is_that_of_the_decoded_levels(self, rounding, bits, per_channel):
    x = np.random.default_rng(bits).laplace(size=(300, 4)).astype(np.float32)
    threshold = np.array([0.5, 1.0, 2.0, 8.0], np.float32) if per_channel else np.float32(1.2)
    quantized, mse, clipped_fraction = quantization.quantize_and_measure(
      x, bits, threshold, rounding, seed=[bits, 1]
    )
    decoded = quantization.dequantize(quantized).numpy()
    self.assertAllClose(mse, np.mean((decoded - x) ** 2), rtol=1e-5)
    self.assertAllClose(clipped_fraction, np.mean(np.abs(x) > threshold))
    same = quantization.quantize(x, bits, threshold, rounding, seed=[bits, 1])
    self.assertAllEqual(quantized.codes, same.codes)

  def test_nothing_is_clipped_at_the_largest_magnitude(self):
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    _, mse, clipped_fraction = quantization.quantize_and_measure(x, 3, np.max(np.abs(x)))
    self.assertEqual(float(clipped_fraction), 0.0)
    self.assertGreater(float(mse), 0.0)


class ErrorsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(0, 17, -1, 2.5, True, '4', None)
  def test_invalid_bits_raise_naming_bits(self, bits):
    with self.assertRaisesRegex(ValueError, '`bits`'):
      quantization.quantize([1.0, 2.0], bits, 1.0)
    with self.assertRaisesRegex(ValueError, '`bits`'):
      quantization.dequantize_codes([0, 1], 1.0, bits, tf.float32)

  def test_unknown_rounding_raises(self):
    with self.assertRaisesRegex(ValueError, '`rounding`'):
      quantization.quantize([1.0, 2.0], 4, 1.0, rounding='up')

  @parameterized.parameters(tf.int32, tf.int64, tf.bool)
  def test_non_float_input_raises_type_error(self, dtype):
    with self.assertRaises(TypeError):
      quantization.quantize(tf.zeros([3], dtype), 4, 1.0)

  @parameterized.parameters(
    ((3, 4), (3,)), ((3, 4), (4, 1)), ((3, 4), (5,)), ((), (1,)), ((4,), (2, 2))
  )
  def test_wrong_threshold_shape_raises(self, x_shape, threshold_shape):
    with self.assertRaisesRegex(ValueError, '`threshold`'):
      quantization.quantize(tf.zeros(x_shape), 4, tf.ones(threshold_shape))

  @parameterized.parameters(
    (tf.zeros([3], tf.int32),), ((tf.zeros([3], tf.int32), 1.0, 4),), (None,)
  )
  def test_dequantize_rejects_other_types(self, value):
    with self.assertRaises(TypeError):
      quantization.dequantize(value)

  @parameterized.parameters(-1.0, float('nan'), float('inf'))
  def test_negative_or_non_finite_threshold_raises(self, threshold):
    with self.assertRaisesRegex(ValueError, '`threshold` must be finite and >= 0'):
      quantization.quantize(tf.constant([0.5, -0.5]), 3, threshold)

  def test_numpy_integer_bits_are_accepted(self):
    codes = quantization.quantize(tf.constant([1.0, -1.0]), np.int64(2), 1.0).codes
    self.assertAllEqual(codes, [3, 0])

  def test_bad_seed_shape_raises(self):
    with self.assertRaisesRegex(ValueError, '`seed`'):
      quantization.quantize([1.0], 4, 1.0, 'stochastic', seed=[1, 2, 3])

  def test_int_seed_is_reproducible_and_equals_its_pair(self):
    x = tf.constant(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    first = quantization.quantize(x, 2, 1.0, 'stochastic', seed=7).codes
    again = quantization.quantize(x, 2, 1.0, 'stochastic', seed=7).codes
    other = quantization.quantize(x, 2, 1.0, 'stochastic', seed=8).codes
    pair = quantization.quantize(x, 2, 1.0, 'stochastic', seed=[0, 7]).codes
    self.assertAllEqual(first, again)
    self.assertAllEqual(first, pair)
    self.assertNotAllEqual(first, other)


class GraphModeTest(tf.test.TestCase):
  def test_quantize_and_dequantize_in_tf_function(self):
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([3])])
    def round_trip(values, thresholds):
      quantized = quantization.quantize(values, 5, thresholds)
      return quantized.codes, quantization.dequantize(quantized)

    thresholds = np.array([0.5, 1.0, 1.5], np.float32)
    codes, restored = round_trip(x, thresholds)
    eager = quantization.quantize(x, 5, thresholds)
    self.assertAllEqual(codes, eager.codes)
    self.assertAllEqual(restored, quantization.dequantize(eager))


if __name__ == '__main__':
  tf.test.main()
