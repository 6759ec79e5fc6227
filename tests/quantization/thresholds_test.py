"""Tests for `tff_clipq.quantization.thresholds` against plain numpy and known optima."""

import functools

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq import quantization
from tff_clipq.quantization import thresholds

# MSE of the optimum uniform quantizer of a unit Gaussian with 2, 4, 8, 16 levels, and its step
# (Max, "Quantizing for minimum distortion", IRE Trans. Inf. Theory, 1960, Table II).
MAX_1960_MSE = {1: 0.3634, 2: 0.1188, 3: 0.03744, 4: 0.01154}
MAX_1960_STEP = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352}

GRID_POINTS = 2000
GRID_SAMPLES = 16384
# Tensors of this size take the histogram search (smaller ones the grid or golden-section search).
LARGE = 2 * thresholds.HISTOGRAM_MIN_ENTRIES


def numpy_quantization_mse(
  x: np.ndarray, thresholds: np.ndarray, bits: int, rounding: str
) -> np.ndarray:
  """Exact (expected, if stochastic) MSE of the symmetric quantizer, one per threshold.

  Written from the definition, independently of the library: levels -s + k * 2s / (2^B - 1),
  nearest rounding picks the closer neighbour, stochastic rounding has variance step^2 p (1 - p).
  """
  magnitudes = np.abs(np.asarray(x, np.float64)).reshape(1, -1)
  thresholds = np.asarray(thresholds, np.float64).reshape(-1, 1)
  step = 2.0 * thresholds / (2**bits - 1)
  shifted = np.minimum(magnitudes, thresholds) + thresholds
  position = np.divide(shifted, step, out=np.zeros_like(shifted), where=step > 0)
  below = np.floor(position)
  fraction = position - below
  if rounding == 'nearest':
    rounding_error = (step * np.minimum(fraction, 1.0 - fraction)) ** 2
  else:
    rounding_error = step**2 * fraction * (1.0 - fraction)
  clipping_error = np.maximum(magnitudes - thresholds, 0.0) ** 2
  return np.mean(clipping_error + rounding_error, axis=1)


def grid_search_mse(x: np.ndarray, bits: int, rounding: str) -> float:
  """The lowest exact MSE over GRID_POINTS thresholds evenly spaced in (0, max|x|]."""
  grid = np.linspace(0.0, np.max(np.abs(x)), GRID_POINTS + 1)[1:]
  chunks = np.array_split(grid, GRID_POINTS // 16)  # Small chunks stay in cache: much faster.
  return min(np.min(numpy_quantization_mse(x, chunk, bits, rounding)) for chunk in chunks)


@functools.lru_cache(maxsize=None)
def sample(distribution: str, size: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if distribution == 'gaussian':
    return rng.standard_normal(size)
  if distribution == 'laplace':
    return rng.laplace(size=size)
  if distribution == 'student_t3':
    return rng.standard_t(3, size=size)
  raise ValueError(distribution)


def exact_mse(x, threshold, bits, rounding='nearest') -> float:
  return float(numpy_quantization_mse(x, [float(threshold)], bits, rounding)[0])


class OptimalityTest(tf.test.TestCase, parameterized.TestCase):
  def test_gaussian_matches_max_1960(self):
    x = tf.constant(sample('gaussian', 1_000_000, seed=1960), tf.float32)
    for bits, optimum in MAX_1960_MSE.items():
      with self.subTest(bits=bits):
        threshold = quantization.optimal_clipping_threshold(x, bits, 'nearest')
        measured = tf.reduce_mean(tf.square(quantization.fake_quantize(x, bits, threshold) - x))
        self.assertAllClose(measured, optimum, rtol=0.02)
        optimal_threshold = MAX_1960_STEP[bits] * (2**bits - 1) / 2
        self.assertAllClose(threshold, optimal_threshold, rtol=0.01)

  @parameterized.product(
    distribution=('gaussian', 'laplace'),
    rounding=quantization.ROUNDING_MODES,
    bits=(2, 3, 4, 5, 6, 7, 8),
  )
  def test_within_one_percent_of_grid_search(self, distribution, rounding, bits):
    x = sample(distribution, GRID_SAMPLES)
    threshold = quantization.optimal_clipping_threshold(x, bits, rounding)
    ours = exact_mse(x, threshold, bits, rounding)
    self.assertAllClose(
      quantization.expected_quantization_mse(x, threshold, bits, rounding), ours, rtol=1e-9
    )
    best = grid_search_mse(x, bits, rounding)
    self.assertLessEqual(ours, 1.01 * best)

  @parameterized.product(distribution=('gaussian', 'laplace'), bits=(1, 2, 4, 8))
  def test_stochastic_empirical_mse_matches_expected(self, distribution, bits):
    x = sample(distribution, GRID_SAMPLES)
    threshold = float(quantization.optimal_clipping_threshold(x, bits, 'stochastic'))
    expected = float(quantization.expected_quantization_mse(x, threshold, bits, 'stochastic'))
    repetitions = 8
    squared_errors = [
      np.mean(
        (quantization.fake_quantize(x, bits, threshold, 'stochastic', seed=[seed, 5]) - x) ** 2
      )
      for seed in range(repetitions)
    ]
    empirical = np.mean(squared_errors)
    # Given x, each entry's squared error is a two-point variable: (p step)^2 w.p. 1 - p and
    # ((1 - p) step)^2 w.p. p, at fractional position p; clipped entries are deterministic.
    step = 2.0 * threshold / (2**bits - 1)
    position = (np.clip(x, -threshold, threshold) + threshold) / step
    p = position - np.floor(position)
    second_moment = step**4 * (p**4 * (1 - p) + (1 - p) ** 4 * p)
    variance = second_moment - (step**2 * p * (1 - p)) ** 2
    standard_error = np.sqrt(np.sum(variance) / repetitions) / x.size
    self.assertLess(abs(empirical - expected), 5 * standard_error)

  @parameterized.parameters(1, 2, 3, 5, 8, 16)
  def test_expected_mse_equals_measured_mse_for_nearest(self, bits):
    x = sample('student_t3', 20000)
    for threshold in (0.1, 1.0, 2.5, 1e3):
      with self.subTest(threshold=threshold):
        measured = np.mean((quantization.fake_quantize(x, bits, threshold).numpy() - x) ** 2)
        expected = quantization.expected_quantization_mse(x, threshold, bits, 'nearest')
        self.assertAllClose(expected, measured, rtol=1e-9, atol=0.0)
        self.assertAllClose(exact_mse(x, threshold, bits), measured, rtol=1e-9, atol=0.0)

  @parameterized.parameters(1, 2, 3, 4)
  def test_paper_noise_model_is_worse_for_stochastic_rounding(self, bits):
    for distribution in ('gaussian', 'laplace'):
      with self.subTest(distribution=distribution):
        x = sample(distribution, GRID_SAMPLES)
        paper = quantization.clipping_threshold(x, bits, 'octav_paper', 'stochastic')
        ours = quantization.clipping_threshold(x, bits, 'octav', 'stochastic')
        self.assertGreater(
          exact_mse(x, paper, bits, 'stochastic'), 1.04 * exact_mse(x, ours, bits, 'stochastic')
        )

  @parameterized.product(rounding=quantization.ROUNDING_MODES, bits=(2, 3, 4, 5, 6))
  def test_matched_fixed_point_alone_is_near_optimal(self, rounding, bits):
    # The noise term matched to this quantizer's step and rounding makes the unrefined OCTAV fixed
    # point nearly optimal already (the paper's c = 4^-B/3 is 3-30% off here, for stochastic).
    x = sample('gaussian', GRID_SAMPLES)
    fixed_point = quantization.octav_fixed_point_threshold(x, bits, rounding, noise_model='matched')
    refined = quantization.optimal_clipping_threshold(x, bits, rounding)
    self.assertLessEqual(
      exact_mse(x, fixed_point, bits, rounding), 1.015 * exact_mse(x, refined, bits, rounding)
    )

  @parameterized.product(bits=(2, 3, 4), rounding=quantization.ROUNDING_MODES)
  def test_max_abs_is_worse_than_octav_on_gaussian_data(self, bits, rounding):
    x = sample('gaussian', GRID_SAMPLES)
    max_abs = quantization.clipping_threshold(x, bits, 'max_abs', rounding)
    octav = quantization.clipping_threshold(x, bits, 'octav', rounding)
    self.assertAllClose(max_abs, np.max(np.abs(x)))
    self.assertGreater(
      exact_mse(x, max_abs, bits, rounding), 1.5 * exact_mse(x, octav, bits, rounding)
    )


class PerChannelTest(tf.test.TestCase, parameterized.TestCase):
  def _kernel(self) -> np.ndarray:
    rng = np.random.default_rng(3)
    columns = [
      0.1 * rng.standard_normal(2048),
      3.0 * rng.laplace(size=2048),
      rng.standard_t(3, size=2048),
      rng.uniform(-2.0, 5.0, size=2048),
      np.full(2048, -0.25),
      np.zeros(2048),
    ]
    return np.stack(columns, axis=-1).reshape(32, 64, 6)

  @parameterized.product(method=quantization.CLIPPING_METHODS, rounding=quantization.ROUNDING_MODES)
  def test_each_channel_gets_its_own_per_tensor_threshold(self, method, rounding):
    kernel = self._kernel()
    thresholds = quantization.clipping_threshold(kernel, 3, method, rounding, per_channel=True)
    self.assertEqual(thresholds.shape, [6])
    for channel in range(6):
      column = kernel[..., channel]
      alone = quantization.clipping_threshold(column, 3, method, rounding)
      # Summation order differs (one pass over all channels), and the search stops at a relative
      # resolution of 0.75% where the exact MSE is flat: compare thresholds at that resolution,
      # and their MSE tightly.
      self.assertAllClose(thresholds[channel], alone, rtol=1e-2, atol=0.0)
      self.assertAllClose(
        exact_mse(column, thresholds[channel], 3, rounding),
        exact_mse(column, alone, 3, rounding),
        rtol=1e-5,
      )
    restored = quantization.fake_quantize(kernel, 3, thresholds, rounding, seed=[1, 1])
    self.assertEqual(restored.shape, kernel.shape)
    self.assertAllEqual(restored[..., 5], np.zeros_like(kernel[..., 5]))
    self.assertAllClose(restored[..., 4], kernel[..., 4])

  def test_per_channel_expected_mse(self):
    kernel = self._kernel()
    thresholds = quantization.optimal_clipping_threshold(kernel, 4, per_channel=True)
    errors = quantization.expected_quantization_mse(kernel, thresholds, 4, per_channel=True)
    for channel in range(6):
      self.assertAllClose(
        errors[channel], exact_mse(kernel[..., channel], thresholds[channel], 4), rtol=1e-9
      )

  def test_per_channel_on_a_scalar_raises(self):
    with self.assertRaisesRegex(ValueError, 'rank'):
      quantization.optimal_clipping_threshold(tf.constant(1.0), 4, per_channel=True)


class RobustnessTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    method=quantization.CLIPPING_METHODS,
    rounding=quantization.ROUNDING_MODES,
    dtype=(tf.float16, tf.float32, tf.float64),
    rows=(10, LARGE // 3),  # LARGE: the histogram search's path.
  )
  def test_all_zero_tensor(self, method, rounding, dtype, rows):
    x = tf.zeros([rows, 3], dtype)
    for bits in (1, 16):
      with self.subTest(bits=bits):
        threshold = quantization.clipping_threshold(x, bits, method, rounding)
        self.assertEqual(threshold.numpy(), 0.0)
        restored = quantization.fake_quantize(x, bits, threshold, rounding)
        self.assertAllEqual(restored, tf.zeros_like(x))
        self.assertEqual(quantization.expected_quantization_mse(x, threshold, bits).numpy(), 0.0)
        per_channel = quantization.clipping_threshold(x, bits, method, rounding, per_channel=True)
        self.assertAllEqual(per_channel, [0.0, 0.0, 0.0])

  @parameterized.product(
    method=quantization.CLIPPING_METHODS, value=(-2.5, 1e-3, 7.0), size=(100, LARGE)
  )
  def test_constant_and_sign_tensors_are_exact(self, method, value, size):
    for x in (
      np.full(size, value, np.float32),
      np.array([value, -value] * (size // 2), np.float32),
    ):
      for bits in (1, 3, 16):
        for rounding in quantization.ROUNDING_MODES:
          with self.subTest(x=x[:2], bits=bits, rounding=rounding):
            threshold = quantization.clipping_threshold(x, bits, method, rounding)
            self.assertAllClose(threshold, abs(value), rtol=1e-6)
            restored = quantization.fake_quantize(x, bits, threshold, rounding)
            self.assertAllClose(restored, x, rtol=1e-6)

  @parameterized.product(scale=(1e-30, 1e30), rounding=quantization.ROUNDING_MODES, bits=(1, 2, 8))
  def test_thresholds_scale_with_the_data(self, scale, rounding, bits):
    x = sample('gaussian', 8192).astype(np.float32)
    scaled = tf.constant(x * np.float32(scale))
    for method in quantization.CLIPPING_METHODS:
      with self.subTest(method=method):
        threshold = quantization.clipping_threshold(scaled, bits, method, rounding)
        self.assertTrue(np.isfinite(threshold.numpy()))
        self.assertGreater(threshold.numpy(), 0.0)
        unscaled = quantization.clipping_threshold(x, bits, method, rounding)
        # Equal MSE (as a function of the threshold it is jagged, so compare errors, not values).
        self.assertAllClose(
          exact_mse(x, threshold.numpy() / scale, bits, rounding),
          exact_mse(x, unscaled, bits, rounding),
          rtol=2e-3,
        )
        restored = quantization.fake_quantize(scaled, bits, threshold, rounding)
        self.assertTrue(np.all(np.isfinite(restored.numpy())))

  @parameterized.product(
    method=quantization.CLIPPING_METHODS,
    rounding=quantization.ROUNDING_MODES,
    size=(4096, LARGE),
  )
  def test_non_finite_entries_are_ignored(self, method, rounding, size):
    finite = sample('laplace', size).astype(np.float32)
    x = finite.copy()
    x[[5, 100, 2000]] = [np.nan, np.inf, -np.inf]
    kept = np.delete(finite, [5, 100, 2000])
    expected = quantization.clipping_threshold(kept, 3, method, rounding)
    threshold = quantization.clipping_threshold(x, 3, method, rounding)
    # Summation order differs, and the exact MSE is jagged in the threshold: compare the MSE.
    self.assertAllClose(threshold, expected, rtol=1e-3)
    self.assertAllClose(
      exact_mse(kept, threshold, 3, rounding), exact_mse(kept, expected, 3, rounding), rtol=1e-4
    )
    restored = quantization.fake_quantize(x, 3, threshold, rounding)
    self.assertTrue(np.all(np.isfinite(restored.numpy())))
    self.assertAllEqual(
      quantization.clipping_threshold([np.nan, np.inf, -np.inf], 3, method, rounding), 0.0
    )

  @parameterized.product(method=quantization.CLIPPING_METHODS, rounding=quantization.ROUNDING_MODES)
  def test_empty_tensor_gets_threshold_zero(self, method, rounding):
    self.assertAllEqual(quantization.clipping_threshold(tf.zeros([0]), 3, method, rounding), 0.0)
    self.assertAllEqual(
      quantization.clipping_threshold(tf.zeros([0, 3]), 3, method, rounding, per_channel=True),
      [0.0, 0.0, 0.0],
    )


class ClippingThresholdTest(tf.test.TestCase, parameterized.TestCase):
  def test_methods_dispatch(self):
    x = sample('gaussian', 4096)
    self.assertAllEqual(
      quantization.clipping_threshold(x, 3, 'octav', 'stochastic'),
      quantization.optimal_clipping_threshold(x, 3, 'stochastic'),
    )
    self.assertAllEqual(
      quantization.clipping_threshold(x, 3, 'octav_paper', 'nearest'),
      quantization.octav_fixed_point_threshold(x, 3, 'nearest', noise_model='paper'),
    )
    self.assertAllEqual(quantization.clipping_threshold(x, 3, 'max_abs'), np.max(np.abs(x)))
    self.assertAllEqual(quantization.clipping_threshold(x, 3, 0.7), 0.7)
    self.assertAllEqual(quantization.clipping_threshold(x, 3, 2), 2.0)
    self.assertAllEqual(
      quantization.clipping_threshold(x.reshape(-1, 4), 3, 0.7, per_channel=True), [0.7] * 4
    )

  def test_noise_coefficients(self):
    for bits in (1, 2, 8, 16):
      nearest = 1.0 / (3.0 * (2**bits - 1) ** 2)
      self.assertAllClose(quantization.noise_coefficient(bits, 'nearest'), nearest)
      self.assertAllClose(quantization.noise_coefficient(bits, 'stochastic'), 2 * nearest)
      for rounding in quantization.ROUNDING_MODES:
        self.assertAllClose(
          quantization.noise_coefficient(bits, rounding, noise_model='paper'), 4.0**-bits / 3
        )

  @parameterized.parameters(0, 0.0, -1.0, -1e-9)
  def test_non_positive_fixed_threshold_raises(self, fixed):
    with self.assertRaisesRegex(ValueError, '> 0'):
      quantization.clipping_threshold([1.0, 2.0], 4, fixed)

  @parameterized.parameters('octave', 'max', True, None)
  def test_unknown_method_raises(self, method):
    with self.assertRaisesRegex(ValueError, '`clipping`'):
      quantization.clipping_threshold([1.0, 2.0], 4, method)

  @parameterized.parameters(0, 17, 2.5, True)
  def test_invalid_bits_raise_naming_bits(self, bits):
    for function in (
      lambda: quantization.optimal_clipping_threshold([1.0, 2.0], bits),
      lambda: quantization.clipping_threshold([1.0, 2.0], bits, 'octav_paper'),
      lambda: quantization.expected_quantization_mse([1.0, 2.0], 1.0, bits),
      lambda: quantization.noise_coefficient(bits),
    ):
      with self.assertRaisesRegex(ValueError, '`bits`'):
        function()

  def test_unknown_rounding_and_noise_model_raise(self):
    with self.assertRaisesRegex(ValueError, '`rounding`'):
      quantization.optimal_clipping_threshold([1.0, 2.0], 4, 'truncate')
    with self.assertRaisesRegex(ValueError, '`rounding`'):
      quantization.expected_quantization_mse([1.0, 2.0], 1.0, 4, 'truncate')
    with self.assertRaisesRegex(ValueError, '`noise_model`'):
      quantization.noise_coefficient(4, 'nearest', noise_model='other')

  def test_integer_input_raises_type_error(self):
    with self.assertRaises(TypeError):
      quantization.optimal_clipping_threshold(tf.constant([1, 2, 3]), 4)
    with self.assertRaises(TypeError):
      quantization.max_abs_threshold(tf.constant([1, 2, 3]))


class BatchedThresholdsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    method=quantization.CLIPPING_METHODS,
    rounding=quantization.ROUNDING_MODES,
    per_channel=(False, True),
  )
  def test_each_tensor_gets_its_own_threshold(self, method, rounding, per_channel):
    rng = np.random.default_rng(3)
    tensors = [  # A model's shapes: small ones padded into one block, the large one a block alone.
      (0.2 * rng.standard_normal((3, 3, 1, 16))).astype(np.float32),
      (0.05 * rng.standard_normal((3, 3, 16, 16))).astype(np.float32),
      rng.laplace(size=(400, 100)).astype(np.float32),
      rng.uniform(-3.0, 1.0, size=(100, 10)).astype(np.float32),
    ]
    tensors[1][0, 0, 0, :2] = [np.nan, np.inf]
    for bits in (2, 4):
      found = thresholds.clipping_thresholds(tensors, bits, method, rounding, per_channel)
      for x, threshold in zip(tensors, found):
        with self.subTest(bits=bits, shape=x.shape):
          alone = quantization.clipping_threshold(x, bits, method, rounding, per_channel)
          self.assertEqual(threshold.shape, alone.shape)
          # Batched, a tensor may take another search path to the same resolution: equal MSE.
          self.assertAllClose(
            quantization.expected_quantization_mse(x, threshold, bits, rounding, per_channel),
            quantization.expected_quantization_mse(x, alone, bits, rounding, per_channel),
            rtol=2e-3,
          )

  @parameterized.product(rounding=quantization.ROUNDING_MODES, per_channel=(False, True))
  def test_all_finite_promise_changes_nothing_for_finite_tensors(self, rounding, per_channel):
    rng = np.random.default_rng(5)
    tensors = [
      (0.2 * rng.standard_normal((3, 3, 1, 16))).astype(np.float32),
      rng.laplace(size=(400, 100)).astype(np.float32),
      rng.uniform(-3.0, 1.0, size=(100, 10)).astype(np.float32),
    ]
    for bits in (2, 4):
      promised = thresholds.clipping_thresholds(
        tensors, bits, 'octav', rounding, per_channel, all_finite=True
      )
      checked = thresholds.clipping_thresholds(tensors, bits, 'octav', rounding, per_channel)
      for with_promise, without in zip(promised, checked):
        self.assertAllEqual(with_promise, without)

  def test_tensors_of_unknown_shape_and_empty_ones(self):
    rng = np.random.default_rng(4)
    small = rng.standard_normal(300).astype(np.float32)
    other = rng.standard_normal(500).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)] * 3)
    def batched(unknown, known, empty):
      known = tf.ensure_shape(known, [500])  # Batched with its double; the others go alone.
      return thresholds.clipping_thresholds([unknown, known, 2.0 * known, empty], 3)

    found = batched(small, other, np.zeros([0], np.float32))
    self.assertAllClose(found[0], quantization.clipping_threshold(small, 3), rtol=1e-2)
    self.assertAllClose(found[1], quantization.clipping_threshold(other, 3), rtol=1e-2)
    self.assertAllClose(found[2], 2.0 * found[1], rtol=1e-5)
    self.assertEqual(float(found[3]), 0.0)


class GraphModeTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    method=quantization.CLIPPING_METHODS,
    rounding=quantization.ROUNDING_MODES,
    static_shape=(True, False),
  )
  def test_thresholds_in_tf_function(self, method, rounding, static_shape):
    x = sample('student_t3', 4096).astype(np.float32).reshape(-1, 8)
    spec_shape = x.shape if static_shape else [None, 8]

    @tf.function(input_signature=[tf.TensorSpec(spec_shape, tf.float32)])
    def thresholds(values):
      return (
        quantization.clipping_threshold(values, 3, method, rounding),
        quantization.clipping_threshold(values, 3, method, rounding, per_channel=True),
      )

    per_tensor, per_channel = thresholds(x)
    self.assertEqual(per_channel.shape, [8])
    eager_tensor = quantization.clipping_threshold(x, 3, method, rounding)
    eager_channel = quantization.clipping_threshold(x, 3, method, rounding, per_channel=True)
    # The exact MSE is jagged in the threshold, so float round-off in a differently-fused graph
    # can move the refined threshold slightly; its MSE must not move.
    self.assertAllClose(per_tensor, eager_tensor, rtol=1e-2)
    self.assertAllClose(per_channel, eager_channel, rtol=1e-2)
    self.assertAllClose(
      exact_mse(x, per_tensor, 3, rounding), exact_mse(x, eager_tensor, 3, rounding), rtol=1e-3
    )


# The error of the mean of K clients' copies (`num_clients`, clipping method 'mean_optimal').
CLIENT_COUNTS = (1, 5, 30)
# Sizes of the two search paths: the histogram search (>= 1024 entries) and the exact one.
MEAN_SIZES = (2000, 600)


def numpy_mean_mse(
  x: np.ndarray, thresholds: np.ndarray, bits: int, num_clients: float
) -> np.ndarray:
  """Exact expected squared error per entry of the mean of `num_clients` copies of x, each
  quantized with independent stochastic rounding; one value per threshold.

  From the definition: copy k is clip(x) + n_k with E n_k = 0 and Var n_k = step^2 p (1 - p) at
  fractional code position p, independent across copies; the mean's error is the (shared)
  clipping error plus the mean of the n_k, whose variance is Var n / K.
  """
  magnitudes = np.abs(np.asarray(x, np.float64)).reshape(1, -1)
  thresholds = np.asarray(thresholds, np.float64).reshape(-1, 1)
  step = 2.0 * thresholds / (2**bits - 1)
  shifted = np.minimum(magnitudes, thresholds) + thresholds
  position = np.divide(shifted, step, out=np.zeros_like(shifted), where=step > 0)
  fraction = position - np.floor(position)
  rounding_variance = step**2 * fraction * (1.0 - fraction)
  clipping_error = np.maximum(magnitudes - thresholds, 0.0) ** 2
  return np.mean(clipping_error + rounding_variance / num_clients, axis=1)


def brute_force_mean_mse(x: np.ndarray, bits: int, num_clients: float) -> float:
  """The lowest `numpy_mean_mse` over GRID_POINTS thresholds evenly spaced in (0, max|x|]."""
  grid = np.linspace(0.0, np.max(np.abs(x)), GRID_POINTS + 1)[1:]
  chunks = np.array_split(grid, GRID_POINTS // 16)
  return min(np.min(numpy_mean_mse(x, chunk, bits, num_clients)) for chunk in chunks)


def simulated_mean_errors(
  x: np.ndarray, threshold: float, bits: int, uniforms: np.ndarray
) -> np.ndarray:
  """Monte Carlo: squared error per entry of the mean of K stochastically quantized copies of x.

  `uniforms` [repeats, K, n] are the rounding draws (the same ones for every threshold: common
  random numbers). Levels -s + k * 2s / (2^B - 1); code floor(position + U). Returns [repeats].
  """
  x = np.asarray(x, np.float64)
  step = 2.0 * threshold / (2**bits - 1)
  position = (np.clip(x, -threshold, threshold) + threshold) / step
  codes = np.minimum(np.floor(position + uniforms), 2**bits - 1)
  mean = np.mean(-threshold + codes * step, axis=1)  # The server's average: [repeats, n].
  return np.mean((mean - x) ** 2, axis=-1)


def mean_optimal(x, bits, num_clients, rounding='stochastic', **kwargs) -> float:
  return float(
    quantization.clipping_threshold(
      x, bits, 'mean_optimal', rounding, num_clients=num_clients, **kwargs
    )
  )


class MeanOfClientsTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.product(
    distribution=('gaussian', 'student_t3'), num_clients=CLIENT_COUNTS, bits=(1, 2, 3, 4)
  )
  def test_monte_carlo_agrees_with_exact_expectation(self, distribution, num_clients, bits):
    x = sample(distribution, 2000, seed=7)
    repeats = 48
    uniforms = np.random.default_rng(11).random((repeats, num_clients, x.size))
    for threshold in (mean_optimal(x, bits, num_clients), 0.5 * np.max(np.abs(x))):
      with self.subTest(threshold=threshold):
        simulated = simulated_mean_errors(x, threshold, bits, uniforms)
        standard_error = np.std(simulated, ddof=1) / np.sqrt(repeats)
        exact = numpy_mean_mse(x, [threshold], bits, num_clients)[0]
        self.assertLess(abs(np.mean(simulated) - exact), 5 * standard_error)
        # The library's expected MSE of the mean is that expectation.
        ours = quantization.expected_quantization_mse(
          x, threshold, bits, 'stochastic', num_clients=num_clients
        )
        self.assertAllClose(ours, exact, rtol=1e-9, atol=0.0)
        self.assertLess(abs(np.mean(simulated) - float(ours)), 5 * standard_error)

  @parameterized.product(
    distribution=('gaussian', 'student_t3'),
    num_clients=CLIENT_COUNTS,
    bits=(1, 2, 3, 4),
    size=MEAN_SIZES,
  )
  def test_mean_optimal_within_two_percent_of_brute_force(
    self, distribution, num_clients, bits, size
  ):
    x = sample(distribution, size, seed=3)
    threshold = mean_optimal(x, bits, num_clients)
    ours = numpy_mean_mse(x, [threshold], bits, num_clients)[0]
    self.assertLessEqual(ours, 1.02 * brute_force_mean_mse(x, bits, num_clients))

  @parameterized.product(bits=(1, 2, 3, 4), size=MEAN_SIZES)
  def test_mean_optimal_beats_octav_for_many_clients(self, bits, size):
    # Why the method exists: 'octav' clips for one copy's rounding noise, which averaging over
    # 30 clients mostly removes; the clipping error it accepted for it stays.
    x = sample('gaussian', size, seed=5)
    octav = float(quantization.clipping_threshold(x, bits, 'octav', 'stochastic'))
    ours = mean_optimal(x, bits, 30)
    self.assertGreater(ours, octav)
    self.assertLess(
      numpy_mean_mse(x, [ours], bits, 30)[0], 0.7 * numpy_mean_mse(x, [octav], bits, 30)[0]
    )

  def test_averaged_fake_quantize_matches_expected_mse_of_the_mean(self):
    # End to end with the library's own stochastic quantizer: K seeds, averaged.
    x = sample('student_t3', 2000, seed=9)
    bits, num_clients, repeats = 2, 5, 12
    threshold = mean_optimal(x, bits, num_clients)
    errors = []
    for repeat in range(repeats):
      copies = [
        quantization.fake_quantize(x, bits, threshold, 'stochastic', seed=[repeat, client])
        for client in range(num_clients)
      ]
      errors.append(np.mean((np.mean(copies, axis=0) - x) ** 2))
    expected = quantization.expected_quantization_mse(
      x, threshold, bits, 'stochastic', num_clients=num_clients
    )
    standard_error = np.std(errors, ddof=1) / np.sqrt(repeats)
    self.assertLess(abs(np.mean(errors) - float(expected)), 5 * standard_error)

  @parameterized.product(
    distribution=('gaussian', 'student_t3'), bits=(1, 2, 3, 4), size=MEAN_SIZES
  )
  def test_more_clients_clip_less(self, distribution, bits, size):
    x = sample(distribution, size, seed=4)
    found = [mean_optimal(x, bits, k) for k in (1, 2, 5, 30, 1000)]
    for fewer, more in zip(found, found[1:]):
      self.assertGreaterEqual(more, fewer)
    self.assertLessEqual(found[-1], np.max(np.abs(x)))

  @parameterized.product(
    rounding=quantization.ROUNDING_MODES, size=MEAN_SIZES, per_channel=(False, True)
  )
  def test_one_client_equals_octav(self, rounding, size, per_channel):
    x = sample('student_t3', size, seed=6).reshape(-1, 4 if per_channel else 1)
    octav = quantization.clipping_threshold(x, 3, 'octav', rounding, per_channel)
    for one in (1, 1.0, np.int64(1)):
      self.assertAllEqual(
        quantization.clipping_threshold(x, 3, 'mean_optimal', rounding, per_channel, one), octav
      )
    self.assertAllEqual(
      quantization.expected_quantization_mse(x, octav, 3, rounding, per_channel, 1),
      quantization.expected_quantization_mse(x, octav, 3, rounding, per_channel),
    )
    self.assertAllEqual(
      thresholds.clipping_thresholds([x, 2 * x], 3, 'mean_optimal', rounding, per_channel),
      thresholds.clipping_thresholds([x, 2 * x], 3, 'octav', rounding, per_channel),
    )

  @parameterized.parameters(*MEAN_SIZES)
  def test_nearest_rounding_ignores_num_clients(self, size):
    x = sample('gaussian', size, seed=8)
    for bits in (1, 3):
      one = quantization.clipping_threshold(x, bits, 'mean_optimal', 'nearest')
      for many in (5, 30.0, tf.constant(30.0)):
        with self.subTest(bits=bits, num_clients=many):
          self.assertAllEqual(
            quantization.clipping_threshold(x, bits, 'mean_optimal', 'nearest', num_clients=many),
            one,
          )
          self.assertAllEqual(
            quantization.expected_quantization_mse(x, one, bits, 'nearest', num_clients=many),
            quantization.expected_quantization_mse(x, one, bits, 'nearest'),
          )

  @parameterized.product(
    size=MEAN_SIZES, static_shape=(True, False), form=('per_tensor', 'per_channel', 'batched')
  )
  def test_num_clients_as_a_tensor_in_tf_function(self, size, static_shape, form):
    x = sample('student_t3', size, seed=10).astype(np.float32).reshape(-1, 4)
    spec_shape = x.shape if static_shape else [None, 4]
    per_channel = form == 'per_channel'

    @tf.function(
      input_signature=[tf.TensorSpec(spec_shape, tf.float32), tf.TensorSpec([], tf.float32)]
    )
    def found(values, num_clients):
      if form == 'batched':
        return thresholds.clipping_thresholds(
          [values, 3.0 * values], 2, 'mean_optimal', 'stochastic', num_clients=num_clients
        )
      return [
        quantization.clipping_threshold(
          values, 2, 'mean_optimal', 'stochastic', per_channel, num_clients=num_clients
        ),
        quantization.expected_quantization_mse(
          values, 1.0, 2, 'stochastic', num_clients=num_clients
        ),
      ]

    for num_clients in (1.0, 5.0, 30.0):
      with self.subTest(num_clients=num_clients):
        first, second = found(x, num_clients)
        eager = quantization.clipping_threshold(
          x, 2, 'mean_optimal', 'stochastic', per_channel, num_clients=num_clients
        )
        # The exact MSE is jagged in the threshold: a differently fused graph may move the
        # threshold slightly, its MSE must not move.
        self.assertAllClose(first, eager, rtol=1e-2)
        if form == 'per_tensor':
          self.assertAllClose(
            numpy_mean_mse(x, [first], 2, num_clients),
            numpy_mean_mse(x, [eager], 2, num_clients),
            rtol=1e-3,
          )
          self.assertAllClose(second, numpy_mean_mse(x, [1.0], 2, num_clients)[0], rtol=1e-5)
        if form == 'batched':
          self.assertAllClose(second, 3.0 * eager, rtol=1e-2)
    # A tensor below 1 (or NaN) is clamped to 1 inside the graph.
    for below in (0.5, 0.0, -3.0, np.nan):
      with self.subTest(num_clients=below):
        self.assertAllClose(found(x, below)[0], found(x, 1.0)[0], rtol=1e-6)

  @parameterized.product(per_channel=(False, True), size=(600, 40000))
  def test_batched_mean_optimal_matches_each_tensor_alone(self, per_channel, size):
    rng = np.random.default_rng(12)
    tensors = [
      (0.2 * rng.standard_normal((3, 3, 1, 16))).astype(np.float32),
      rng.laplace(size=(size // 100, 100)).astype(np.float32),
      rng.standard_t(3, size=(100, 10)).astype(np.float32),
    ]
    for bits in (1, 3):
      found = thresholds.clipping_thresholds(
        tensors, bits, 'mean_optimal', 'stochastic', per_channel, num_clients=5
      )
      for x, threshold in zip(tensors, found):
        with self.subTest(bits=bits, shape=x.shape):
          alone = quantization.clipping_threshold(
            x, bits, 'mean_optimal', 'stochastic', per_channel, num_clients=5
          )
          mse = functools.partial(
            quantization.expected_quantization_mse,
            x,
            bits=bits,
            rounding='stochastic',
            per_channel=per_channel,
            num_clients=5,
          )
          self.assertAllClose(mse(threshold=threshold), mse(threshold=alone), rtol=2e-3)

  @parameterized.parameters(0, 0.5, -1, float('nan'), float('inf'), True)
  def test_invalid_num_clients_raise_naming_num_clients(self, num_clients):
    x = [1.0, 2.0]
    for function in (
      lambda: quantization.optimal_clipping_threshold(x, 2, num_clients=num_clients),
      lambda: thresholds.optimal_clipping_thresholds([x], 2, num_clients=num_clients),
      lambda: quantization.clipping_threshold(
        x, 2, 'mean_optimal', 'stochastic', num_clients=num_clients
      ),
      lambda: quantization.clipping_threshold(x, 2, 'octav', num_clients=num_clients),
      lambda: thresholds.clipping_thresholds([x], 2, 'mean_optimal', num_clients=num_clients),
      lambda: quantization.expected_quantization_mse(x, 1.0, 2, num_clients=num_clients),
    ):
      with self.assertRaisesRegex(ValueError, r'`num_clients`.*' + repr(num_clients)):
        function()

  def test_non_scalar_or_non_numeric_num_clients_tensor_raises(self):
    with self.assertRaisesRegex(ValueError, '`num_clients`'):
      quantization.clipping_threshold([1.0, 2.0], 2, 'mean_optimal', num_clients=[5.0, 6.0])
    with self.assertRaisesRegex(TypeError, '`num_clients`'):
      quantization.clipping_threshold([1.0, 2.0], 2, 'mean_optimal', num_clients=tf.constant('5'))


if __name__ == '__main__':
  tf.test.main()
