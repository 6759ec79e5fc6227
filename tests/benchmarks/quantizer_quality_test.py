"""Smoke tests for `benchmarks/quantizer_quality.py`: the pieces whose claims the report relies on."""

import benchmark_loader
import numpy as np
import tensorflow as tf

benchmark = benchmark_loader.load('quantizer_quality')


class QuantizerQualityBenchmarkTest(tf.test.TestCase):
  def test_tff_encoder_is_min_max_with_two_to_the_bits_levels(self):
    # What the report says about TFF's convention: levels min + k (max - min) / (2^B - 1).
    x = tf.constant(np.random.default_rng(0).uniform(-1.0, 3.0, 1000), tf.float32)
    for bits in (1, 2, 4):
      decoded = benchmark.tff_encode_decode(x, bits, stochastic=False).numpy()
      low, high = float(tf.reduce_min(x)), float(tf.reduce_max(x))
      levels = low + np.arange(2**bits) * (high - low) / (2**bits - 1)
      self.assertAllClose(np.unique(decoded), levels, rtol=1e-5, atol=1e-5)
      nearest = levels[np.argmin(np.abs(x.numpy()[:, None] - levels), axis=1)]
      self.assertAllClose(decoded, nearest, atol=1e-5)
    stochastic = benchmark.tff_encode_decode(x, 2, stochastic=True).numpy()
    self.assertAllClose(np.mean(stochastic), np.mean(x.numpy()), atol=0.05)

  def test_nmse_table_rows(self):
    tensors = benchmark.synthetic_tensors(512, seed=0)
    table = benchmark.nmse_table(tensors[:1], benchmark.methods(tff_repeats=1))
    rows = table['gaussian']
    self.assertLen(rows, 8)
    for by_bits in rows.values():
      self.assertEqual(sorted(by_bits), list(benchmark.BITS))
      self.assertTrue(all(np.isfinite(v) and v >= 0 for v in by_bits.values()))
    self.assertLess(rows['ours: octav, nearest'][2], rows['max_abs, nearest'][2])

  def test_training_images_fall_back_to_digits_without_mnist(self):
    empty = self.create_tempdir().full_path
    images, labels, source = benchmark.load_training_images(empty)
    self.assertEqual(images.shape[1:], (8, 8, 1))
    self.assertLen(labels, len(images))
    self.assertBetween(float(images.max()), 0.5, 1.0)
    self.assertIn('no MNIST', source)


if __name__ == '__main__':
  tf.test.main()
