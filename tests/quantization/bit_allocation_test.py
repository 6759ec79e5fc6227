"""Tests of widths allocated within a bit budget and of codes of mixed widths in one buffer."""

import itertools

import numpy as np
import tensorflow as tf

from tff_clipq.quantization import bit_allocation
from tff_clipq.quantization import thresholds

MAX_WIDTH = bit_allocation.MAX_WIDTH


def _brute_force(errors: np.ndarray, sizes: list[int], total_bits: int) -> float:
  """The least total error of any widths 1..MAX_WIDTH within the budget."""
  return min(
    sum(errors[t, width - 1] for t, width in enumerate(widths))
    for widths in itertools.product(range(1, MAX_WIDTH + 1), repeat=len(sizes))
    if np.dot(widths, sizes) <= total_bits
  )


def _tensors(rng: np.random.Generator, sizes: list[int]) -> list[tf.Tensor]:
  """Gaussian and heavy-tailed tensors of different scales."""
  return [
    tf.constant(
      (rng.standard_t(3, size) if i % 2 else rng.standard_normal(size)).astype(np.float32)
      * rng.uniform(0.1, 3.0)
    )
    for i, size in enumerate(sizes)
  ]


def _total_error(errors: np.ndarray, widths: np.ndarray) -> float:
  return float(sum(errors[t, width - 1] for t, width in enumerate(widths)))


class BudgetTest(tf.test.TestCase):
  def test_parse(self):
    self.assertEqual(bit_allocation.parse_budget('budget:2.15'), bit_allocation.BitBudget(2.15))
    self.assertEqual(str(bit_allocation.parse_budget(' budget:1 ')), 'budget:1')
    for bad in ('budget:', 'budget:0.5', 'budget:9', 'budget:nan', 'budget:two'):
      with self.assertRaisesRegex(ValueError, 'budget:<average bits per coordinate>'):
        bit_allocation.parse_budget(bad)
    self.assertTrue(bit_allocation.is_budget('budget:2'))
    self.assertFalse(bit_allocation.is_budget('4-2-2-4'))

  def test_total_bits_reads_the_decimal(self):
    # 2.15 x 100 is 215.00000000000003 in binary floating point, 0.1 x 30 is 3.0000000000000004.
    self.assertEqual(bit_allocation.BitBudget(2.15).total_bits(100), 215)
    self.assertEqual(bit_allocation.BitBudget(1.1).total_bits(30), 33)


class AllocationTest(tf.test.TestCase):
  def test_candidate_errors_are_the_expected_squared_errors(self):
    x = tf.constant(np.random.default_rng(0).standard_normal(50).astype(np.float32))
    for clipping in ('max_abs', 'octav'):
      found, errors = bit_allocation.candidate_errors([x], clipping, 'stochastic')
      self.assertEqual(errors.shape, (1, MAX_WIDTH))
      for bits in (1, 3, 8):
        threshold = thresholds.clipping_threshold(x, bits, clipping, 'stochastic')
        self.assertAllClose(found[0, bits - 1], threshold, rtol=1e-6)
        expected = thresholds.expected_quantization_mse(x, threshold, bits, 'stochastic')
        self.assertAllClose(errors[0, bits - 1], 50 * expected, rtol=1e-5)
      self.assertTrue(np.all(np.diff(errors.numpy()[0]) < 0), msg=clipping)

  def test_matches_brute_force_on_small_tensors(self):
    rng = np.random.default_rng(1)
    for trial in range(40):
      sizes = [int(n) for n in rng.integers(4, 60, size=rng.integers(1, 4))]
      clipping = ('max_abs', 'octav')[trial % 2]
      rounding = ('stochastic', 'nearest')[trial % 3 == 0]
      _, errors = bit_allocation.candidate_errors(_tensors(rng, sizes), clipping, rounding)
      errors = errors.numpy().astype(np.float64)
      total_bits = int(sum(sizes) * rng.uniform(1.0, 5.0))
      widths = bit_allocation.allocate_widths(errors, sizes, total_bits).numpy()
      self.assertLessEqual(int(np.dot(widths, sizes)), total_bits)
      self.assertTrue(np.all((widths >= 1) & (widths <= MAX_WIDTH)))
      self.assertAllClose(
        _total_error(errors, widths), _brute_force(errors, sizes, total_bits), rtol=1e-12
      )

  def test_greedy_is_within_budget_and_never_beats_the_exhaustive_search(self):
    rng = np.random.default_rng(2)
    exact_at_equal_sizes = 0
    for trial in range(20):
      sizes = [int(n) for n in rng.integers(4, 60, size=3)]
      if trial % 2:
        sizes = [sizes[0]] * 3
      _, errors = bit_allocation.candidate_errors(_tensors(rng, sizes), 'max_abs', 'stochastic')
      errors = errors.numpy().astype(np.float64)
      total_bits = int(sum(sizes) * rng.uniform(1.0, 4.0))
      greedy = bit_allocation.greedy_widths(errors, sizes, total_bits).numpy()
      best = bit_allocation.best_widths(errors, sizes, total_bits).numpy()
      self.assertLessEqual(int(np.dot(greedy, sizes)), total_bits)
      self.assertGreaterEqual(_total_error(errors, greedy), _total_error(errors, best) - 1e-9)
      # With equal sizes and convex errors every step costs the same: greedy is optimal.
      if trial % 2:
        self.assertAllClose(_total_error(errors, greedy), _total_error(errors, best))
        exact_at_equal_sizes += 1
    self.assertEqual(exact_at_equal_sizes, 10)

  def test_more_tensors_than_the_exhaustive_limit_use_the_greedy_allocation(self):
    sizes = [10] * (bit_allocation.EXHAUSTIVE_TENSORS + 1)
    errors = np.array([[4.0 ** (-b) * (t + 1) for b in range(MAX_WIDTH)] for t in range(6)])
    widths = bit_allocation.allocate_widths(errors, sizes, 30 * 6).numpy()
    self.assertAllEqual(widths, bit_allocation.greedy_widths(errors, sizes, 180).numpy())
    self.assertEqual(int(np.dot(widths, sizes)), 180)
    self.assertGreaterEqual(widths[-1], widths[0])  # The largest errors get the most bits.

  def test_a_budget_below_one_bit_each_raises(self):
    with self.assertRaisesRegex(ValueError, 'below 1 bit'):
      bit_allocation.allocate_widths(np.ones([2, MAX_WIDTH]), [10, 10], 19)

  def test_zero_tensors_keep_one_bit(self):
    _, errors = bit_allocation.candidate_errors(
      [tf.zeros([20]), tf.ones([20])], 'max_abs', 'nearest'
    )
    widths = bit_allocation.allocate_widths(errors, [20, 20], 320).numpy()
    self.assertAllEqual(widths, [1, 1])  # +-1 at one bit is exact: no bit removes any error.


class MixedWidthPackingTest(tf.test.TestCase):
  def test_round_trip(self):
    rng = np.random.default_rng(3)
    for _ in range(10):
      sizes = [int(n) for n in rng.integers(1, 40, size=rng.integers(1, 5))]
      widths = rng.integers(1, MAX_WIDTH + 1, size=len(sizes)).astype(np.int32)
      codes = [rng.integers(0, 2**w, n).astype(np.int32) for n, w in zip(sizes, widths)]
      num_words = -(-int(np.dot(sizes, widths)) // 32) + int(rng.integers(0, 2))
      words = bit_allocation.pack_mixed_widths(codes, tf.constant(widths), num_words)
      self.assertEqual(words.shape, (num_words,))
      self.assertTrue(bit_allocation.widths_are_valid(tf.constant(widths), sizes, words))
      unpacked = bit_allocation.unpack_mixed_widths(words, tf.constant(widths), sizes)
      for expected, actual in zip(codes, unpacked):
        self.assertAllEqual(actual, expected)

  def test_layout_is_the_packing_bit_stream(self):
    # Codes 1 (1 bit) then 2 (2 bits) then 5 (3 bits): bits 1 | 0 1 | 1 0 1 = 0b101101.
    words = bit_allocation.pack_mixed_widths(
      [tf.constant([1]), tf.constant([2]), tf.constant([5])], tf.constant([1, 2, 3]), 1
    )
    self.assertAllEqual(words, [0b101101])

  def test_invalid_widths_or_padding_are_detected(self):
    sizes = [10, 5]
    words = bit_allocation.pack_mixed_widths(
      [tf.zeros([10], tf.int32), tf.ones([5], tf.int32)], tf.constant([2, 1]), 1
    )
    valid = lambda widths, w=words: bool(
      bit_allocation.widths_are_valid(tf.constant(widths, tf.int32), sizes, w)
    )
    self.assertTrue(valid([2, 1]))
    self.assertFalse(valid([0, 1]))  # Below 1.
    self.assertFalse(valid([MAX_WIDTH + 1, 1]))  # Above the widest.
    self.assertFalse(valid([3, 1]))  # 35 bits do not fit in one word.
    # Read as 1-bit codes the 5 set bits of the second tensor lie in the spare bits.
    self.assertFalse(valid([1, 1]))
    self.assertFalse(valid([2, 1], tf.bitwise.bitwise_or(words, 1 << 30)))


if __name__ == '__main__':
  tf.test.main()
