"""Tests for `tff_clipq.quantization.packing`, and the whole encode/decode path in graph mode."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq import quantization

ALL_BITS = tuple(range(1, 17))
LENGTHS = (0, 1, 31, 32, 33, 1000)


def _random_codes(bits: int, length: int, seed: int = 0) -> np.ndarray:
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=length, dtype=np.int64)
  if length >= 2:  # Always include the extreme codes (all bits set matters for the sign bit).
    codes[0], codes[-1] = 2**bits - 1, 0
  return codes.astype(np.int32)


class PackingTest(tf.test.TestCase, parameterized.TestCase):
  @parameterized.parameters(*ALL_BITS)
  def test_round_trip_and_packed_length(self, bits):
    for length in LENGTHS:
      with self.subTest(length=length):
        codes = _random_codes(bits, length, seed=bits)
        words = quantization.pack_codes(codes, bits)
        self.assertEqual(words.dtype, tf.int32)
        expected_words = -(-length * bits // 32)
        self.assertEqual(quantization.packed_length(length, bits), expected_words)
        self.assertEqual(words.shape, [expected_words])
        unpacked = quantization.unpack_codes(words, bits, length)
        self.assertEqual(unpacked.dtype, tf.int32)
        self.assertAllEqual(unpacked, codes)

  def test_round_trip_of_a_shaped_tensor(self):
    codes = _random_codes(5, 60).reshape(3, 4, 5)
    words = quantization.pack_codes(codes, 5)
    self.assertAllEqual(quantization.unpack_codes(words, 5, 60), codes.reshape(-1))

  def test_little_endian_layout(self):
    # Code i occupies bits [i*B, (i+1)*B) of the word stream.
    self.assertAllEqual(quantization.pack_codes([1, 2], 4), [0x21])
    self.assertAllEqual(quantization.pack_codes([0xFFFF, 0xFFFF], 16), [-1])
    self.assertAllEqual(quantization.pack_codes([0x7FFF, 0x8000], 16), [-(2**31) + 0x7FFF])
    # 11 codes of 3 bits: 33 bits, the last one straddles into a second word.
    self.assertAllEqual(quantization.pack_codes([7] * 11, 3), [-1, 1])
    self.assertAllEqual(quantization.pack_codes([0] * 10 + [6], 3), [-(2**31), 1])
    self.assertAllEqual(quantization.pack_codes([1] * 32, 1), [-1])

  def test_unused_padding_bits_are_zero(self):
    for bits in (3, 5, 7, 8, 13):
      words = quantization.pack_codes(np.full(3, 2**bits - 1, np.int32), bits).numpy()
      used = 3 * bits
      stream = np.unpackbits(words.view(np.uint8), bitorder='little')
      self.assertTrue(np.all(stream[:used] == 1))
      self.assertTrue(np.all(stream[used:] == 0))

  def test_graph_mode(self):
    codes = _random_codes(7, 100)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def round_trip(values):
      return quantization.unpack_codes(quantization.pack_codes(values, 7), 7, 100)

    self.assertAllEqual(round_trip(codes), codes)

  def test_errors(self):
    for bits in (0, 17, 2.5, True):
      with self.assertRaisesRegex(ValueError, '`bits`'):
        quantization.pack_codes([1], bits)
      with self.assertRaisesRegex(ValueError, '`bits`'):
        quantization.unpack_codes(tf.constant([1]), bits, 1)
      with self.assertRaisesRegex(ValueError, '`bits`'):
        quantization.packed_length(1, bits)
    with self.assertRaisesRegex(ValueError, '`num_codes`'):
      quantization.packed_length(-1, 4)
    with self.assertRaises(TypeError):
      quantization.pack_codes(tf.constant([1.0]), 4)
    with self.assertRaises(TypeError):
      quantization.unpack_codes(tf.constant([1], tf.int64), 4, 1)


class EncodeDecodeGraphTest(tf.test.TestCase, parameterized.TestCase):
  """threshold -> quantize -> pack -> unpack -> dequantize inside one tf.function, as TFF traces."""

  @parameterized.product(bits=(1, 3, 8), rounding=quantization.ROUNDING_MODES)
  def test_matches_eager_fake_quantization(self, bits, rounding):
    x = np.random.default_rng(bits).standard_t(3, size=(40, 16)).astype(np.float32)
    seed = tf.constant([4, 2])

    @tf.function(input_signature=[tf.TensorSpec([40, 16], tf.float32)])
    def encode_decode(values):
      threshold = quantization.clipping_threshold(values, bits, 'octav', rounding, per_channel=True)
      quantized = quantization.quantize(values, bits, threshold, rounding, seed=seed)
      words = quantization.pack_codes(quantized.codes, bits)
      codes = tf.reshape(quantization.unpack_codes(words, bits, 40 * 16), [40, 16])
      restored = quantization.dequantize_codes(codes, threshold, bits, tf.float32)
      return threshold, words, codes, restored

    threshold, words, codes, restored = encode_decode(x)
    self.assertEqual(words.shape, [quantization.packed_length(40 * 16, bits)])
    # Eager reference at the graph's threshold (the threshold itself is tested elsewhere).
    expected = quantization.quantize(x, bits, threshold, rounding, seed=seed)
    self.assertAllEqual(codes, expected.codes)
    # Levels may differ in the last bit: graph optimizations reorder the step arithmetic.
    self.assertAllClose(restored, quantization.dequantize(expected), rtol=1e-6, atol=1e-6)
    self.assertTrue(np.all(np.abs(restored.numpy()) <= threshold.numpy() * (1 + 1e-6)))


if __name__ == '__main__':
  tf.test.main()
