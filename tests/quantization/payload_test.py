"""Tests for `tff_clipq.quantization.payload`: encoding a client's tensors and decoding them."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload

SHAPES = [(3, 3, 1, 16), (16,), (400, 10), (10,)]


def client_tensors(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [(0.1 * rng.standard_normal(shape)).astype(np.float32) for shape in SHAPES]


class EncodeTensorsTest(tf.test.TestCase, parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.plan = encoding_plan.make_plan(
      SHAPES, (2, 4), min_size_to_quantize=100, rounding='stochastic'
    )
    self.seed = tf.constant([3, 4], tf.int64)

  def test_decoded_error_is_the_reported_error(self):
    tensors = client_tensors()
    quantized, floats, statistics, accepted = payload.encode_tensors(self.plan, tensors, self.seed)
    self.assertTrue(accepted)
    self.assertTrue(payload.payload_is_well_formed(self.plan, quantized))
    decoded = payload.decode_quantized(self.plan, quantized)
    quantized_inputs = [tensors[i] for i in self.plan.quantized_indices]
    self.assertAllClose(
      statistics['quantization_mse'],
      [np.mean((d.numpy() - x) ** 2) for d, x in zip(decoded, quantized_inputs)],
      rtol=1e-5,
    )
    self.assertAllClose(
      statistics['clipped_fraction'],
      [np.mean(np.abs(x) > part['threshold']) for x, part in zip(quantized_inputs, quantized)],
    )
    self.assertAllEqual(floats[0], tensors[1])
    self.assertAllEqual(floats[1], tensors[3])

  @parameterized.product(bits=(1, 2, 3, 4, 8, 16), per_channel=(False, True))
  def test_weighted_levels_are_the_weighted_decoded_levels(self, bits, per_channel):
    plan = encoding_plan.make_plan(SHAPES, bits, min_size_to_quantize=100, per_channel=per_channel)
    quantized, _, _, _ = payload.encode_tensors(plan, client_tensors(1), self.seed)
    decoded = payload.decode_quantized(plan, quantized)
    for encoding, part, levels in zip(plan.quantized, quantized, decoded):
      weighted = payload.weighted_levels(encoding, part, tf.constant(2.5))
      self.assertEqual(weighted.shape, encoding.shape)
      self.assertAllClose(weighted, 2.5 * levels.numpy(), rtol=1e-6, atol=1e-7)
      zero_weight = payload.weighted_levels(encoding, part, tf.constant(0.0))
      self.assertAllEqual(zero_weight, tf.zeros(encoding.shape))

  @parameterized.named_parameters(
    ('nan', np.nan, True), ('inf', np.inf, True), ('not_taking_part', 0.0, False)
  )
  def test_rejected_client_sends_only_zeros(self, bad_value, takes_part):
    tensors = client_tensors()
    tensors[2][5, 5] = bad_value if takes_part else tensors[2][5, 5]
    tensors[1][0] = bad_value if takes_part else tensors[1][0]
    quantized, floats, statistics, accepted = payload.encode_tensors(
      self.plan, tensors, self.seed, tf.constant(takes_part)
    )
    self.assertFalse(accepted)
    for part in tf.nest.flatten([quantized, floats, statistics]):
      self.assertAllEqual(part, tf.zeros_like(part))
    self.assertTrue(payload.payload_is_well_formed(self.plan, quantized))


if __name__ == '__main__':
  tf.test.main()
