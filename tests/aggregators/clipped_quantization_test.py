"""Tests of the clipped-quantization mean aggregators against plain numpy references."""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import aggregator_fixtures

from tff_clipq import aggregators
from tff_clipq.aggregators import clipped_quantization
from tff_clipq import quantization
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload

MATRIX = aggregator_fixtures.MATRIX
BIAS = aggregator_fixtures.BIAS
VALUE_TYPE = aggregator_fixtures.VALUE_TYPE
WEIGHT_TYPE = aggregator_fixtures.WEIGHT_TYPE
_client_values = aggregator_fixtures.client_values


def _numpy_nearest_reconstruction(x: np.ndarray, bits: int) -> np.ndarray:
  """Independent numpy quantizer at the library's threshold, nearest rounding."""
  threshold = float(quantization.optimal_clipping_threshold(tf.constant(x), bits, 'nearest'))
  step = 2 * threshold / (2**bits - 1)
  codes = np.floor((np.clip(x, -threshold, threshold) + threshold) / step + 0.5)
  return codes * step - threshold


def _encode_and_aggregate(factory):
  """The factory's client encoding, and its server aggregation over hand-fed payloads."""
  codec = clipped_quantization.build_codec(
    factory.settings, tff.aggregators.SumFactory(), VALUE_TYPE, WEIGHT_TYPE
  )

  def aggregate(payloads):
    accumulator = codec.zero_fn()
    for payload_value in payloads:
      accumulator = codec.accumulate_fn(
        accumulator,
        collections.OrderedDict((key, payload_value[key]) for key in codec.aggregate_keys),
      )
    return accumulator

  return codec.encode_fn, aggregate


class ClippedQuantizationMeanTest(tf.test.TestCase):
  def _run(self, factory, values, weights=None):
    if weights is None:
      process = factory.create(VALUE_TYPE)
      return process.next(process.initialize(), values)
    process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
    return process.next(process.initialize(), values, weights)

  def test_wire_type_is_the_packed_payload(self):
    factory = aggregators.clipped_quantization_mean(
      bits=3, rounding='nearest', weighting='uniform', min_size_to_quantize=100
    )
    process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
    output = process.next(process.initialize(), _client_values(2), [1.0, 1.0])
    measured = output.measurements['quantized']
    # 120 codes x 3 bits -> 12 int32 words, one float32 threshold, one bool; bias in float32.
    expected_bits = 12 * 32 + 32 + 8 + 10 * 32
    self.assertEqual(measured['client_upload_bits'], expected_bits)
    self.assertEqual(measured['round_upload_bits'], 2 * expected_bits)
    self.assertAllClose(measured['bits_per_coordinate'], expected_bits / 130)
    self.assertAllClose(measured['compression_ratio'], 32 * 130 / expected_bits)
    self.assertAllEqual(measured['per_tensor']['bits'], [3])

  def test_inverse_error_mean_matches_numpy_reference(self):
    values = _client_values(3)
    factory = aggregators.clipped_quantization_mean(
      bits=2,
      clipping='octav',
      rounding='nearest',
      weighting='inverse_error',
      min_size_to_quantize=100,
    )
    output = self._run(factory, values, [5.0, 1.0, 1.0])
    reconstructions = [_numpy_nearest_reconstruction(v[0], 2) for v in values]
    errors = [np.mean((r - v[0]) ** 2) for r, v in zip(reconstructions, values)]
    weights = 1.0 / np.array(errors)
    expected = np.tensordot(weights, np.stack(reconstructions), axes=1) / weights.sum()
    self.assertAllClose(output.result[0], expected, rtol=1e-3, atol=1e-4)
    # Float bias: uniform weighting (its error is zero), example weights are never used.
    self.assertAllClose(output.result[1], np.mean([v[1] for v in values], axis=0), atol=1e-6)
    self.assertAllClose(
      output.measurements['quantized']['weight_max_over_min'],
      weights.max() / weights.min(),
      rtol=1e-4,
    )
    self.assertAllClose(
      output.measurements['quantized']['quantization_mse'], np.mean(errors), rtol=1e-4
    )

  def test_example_count_and_uniform_weighting_match_numpy(self):
    values = _client_values(3)
    counts = np.array([1.0, 2.0, 7.0], np.float32)
    reconstructions = np.stack([_numpy_nearest_reconstruction(v[0], 4) for v in values])
    biases = np.stack([v[1] for v in values])
    weighted = aggregators.clipped_quantization_mean(
      bits=4,
      clipping='octav',
      rounding='nearest',
      weighting='example_count',
      min_size_to_quantize=100,
    )
    output = self._run(weighted, values, list(counts))
    self.assertAllClose(
      output.result[0],
      np.tensordot(counts, reconstructions, 1) / counts.sum(),
      rtol=1e-3,
      atol=1e-4,
    )
    self.assertAllClose(output.result[1], np.tensordot(counts, biases, 1) / counts.sum(), atol=1e-4)
    uniform = aggregators.unweighted_clipped_quantization_mean(
      bits=4, clipping='octav', rounding='nearest', weighting='uniform', min_size_to_quantize=100
    )
    output = self._run(uniform, values)
    self.assertAllClose(output.result[0], reconstructions.mean(axis=0), rtol=1e-3, atol=1e-4)

  def test_per_tensor_bits_and_size_threshold(self):
    factory = aggregators.unweighted_clipped_quantization_mean(
      bits='3-5', rounding='nearest', weighting='uniform', min_size_to_quantize=0
    )
    output = self._run(factory, _client_values(2))
    per_tensor = output.measurements['quantized']['per_tensor']
    self.assertAllEqual(per_tensor['bits'], [3, 5])
    words = -(-120 * 3 // 32) + -(-10 * 5 // 32)
    self.assertEqual(
      output.measurements['quantized']['client_upload_bits'], 32 * words + 2 * 32 + 8
    )
    with self.assertRaisesRegex(ValueError, 'expected 1 .* or 2'):
      aggregators.unweighted_clipped_quantization_mean(
        bits='3-5-4', min_size_to_quantize=100
      ).create(VALUE_TYPE)

  def test_a_list_of_widths_is_reported_tensor_by_tensor(self):
    # Four widths for four tensors of which two are small: read one per tensor, and said so.
    factory = aggregators.clipped_quantization_mean(bits='4-2-2-4', min_size_to_quantize=10)
    value_type = tff.to_type(
      [(np.float32, [20]), (np.float32, [3]), (np.float32, [30]), (np.float32, [4])]
    )
    with self.assertLogs('absl', level='INFO') as logs:
      factory.create(value_type, tff.TensorType(np.float32))
    self.assertIn('[20]: 4, [3]: float32, [30]: 2, [4]: float32', '\n'.join(logs.output))

  def test_stochastic_rounding_is_reproducible_and_advances(self):
    factory = aggregators.unweighted_clipped_quantization_mean(
      bits=2, rounding='stochastic', weighting='uniform', seed=7, min_size_to_quantize=100
    )
    process = factory.create(VALUE_TYPE)
    values = _client_values(2)
    state = process.initialize()
    first = process.next(state, values)
    again = process.next(state, values)
    second_round = process.next(first.state, values)
    self.assertAllEqual(first.result[0], again.result[0])
    self.assertNotAllEqual(first.result[0], second_round.result[0])
    self.assertEqual(first.state['round_seed'], 8)

  def test_nonfinite_client_is_rejected_and_counted(self):
    values = _client_values(3)
    poisoned = [v.copy() for v in values[2]]
    poisoned[0][0, 0] = np.nan
    factory = aggregators.unweighted_clipped_quantization_mean(
      bits=4, rounding='nearest', weighting='inverse_error', min_size_to_quantize=100
    )
    output = self._run(factory, values[:2] + [poisoned])
    clean = self._run(factory, values[:2])
    self.assertAllClose(output.result[0], clean.result[0])
    self.assertAllClose(output.result[1], clean.result[1])
    self.assertEqual(output.measurements['quantized']['rejected_nonfinite_clients'], 1)
    self.assertEqual(output.measurements['quantized']['accepted_clients'], 2)

  def test_all_clients_rejected_gives_zeros(self):
    values = _client_values(2)
    for client in values:
      client[1][0] = np.inf
    factory = aggregators.clipped_quantization_mean(
      bits=4, weighting='example_count', min_size_to_quantize=100
    )
    output = self._run(factory, values, [1.0, 1.0])
    self.assertAllEqual(output.result[0], np.zeros([12, 10]))
    self.assertAllEqual(output.result[1], np.zeros([10]))
    self.assertEqual(output.measurements['quantized']['accepted_clients'], 0)

  def test_non_positive_weight_rejects_the_client_in_every_weighting(self):
    values = _client_values(3)
    for weighting in aggregators.WEIGHTINGS:
      factory = aggregators.clipped_quantization_mean(
        bits=4, weighting=weighting, rounding='nearest', min_size_to_quantize=100
      )
      # Weight 0 is TFF's marker of a client whose update was non-finite (and zeroed).
      output = self._run(factory, values, [1.0, 0.0, -3.0])
      alone = self._run(factory, values[:1], [1.0])
      self.assertEqual(output.measurements['quantized']['rejected_nonfinite_clients'], 2)
      self.assertAllClose(output.result[0], alone.result[0])
      self.assertAllClose(output.result[1], alone.result[1])

  def test_float_tensors_summed_in_the_aggregate_match_an_inner_factory(self):
    """The default SumFactory is folded into the aggregate; any other runs as its own process."""
    values, weights = _client_values(3), [1.0, 2.0, 3.0]
    settings = dict(bits=4, rounding='nearest', weighting='example_count', min_size_to_quantize=100)
    folded = aggregators.clipped_quantization_mean(**settings)
    inner = tff.aggregators.zeroing_factory(
      zeroing_norm=1e9, inner_agg_factory=tff.aggregators.SumFactory()
    )
    separate = aggregators.clipped_quantization_mean(**settings, inner_agg_factory=inner)
    folded_codec = clipped_quantization.build_codec(
      folded.settings, tff.aggregators.SumFactory(), VALUE_TYPE, WEIGHT_TYPE
    )
    self.assertIsNone(folded_codec.inner_process)
    self.assertIn('weighted_floats', folded_codec.aggregate_keys)
    separate_codec = clipped_quantization.build_codec(
      separate.settings, inner, VALUE_TYPE, WEIGHT_TYPE
    )
    self.assertIsNotNone(separate_codec.inner_process)
    self.assertNotIn('weighted_floats', separate_codec.aggregate_keys)

    folded_output = self._run(folded, values, weights)
    separate_output = self._run(separate, values, weights)
    expected_bias = np.tensordot(weights, np.stack([v[1] for v in values]), 1) / sum(weights)
    for output in (folded_output, separate_output):
      self.assertAllClose(output.result[1], expected_bias, atol=1e-5)
    self.assertAllClose(folded_output.result[0], separate_output.result[0])
    # The state and measurements keep the inner factory's (here empty) parts.
    self.assertEqual(folded_output.state['float_tensors'], ())
    self.assertEqual(folded_output.measurements['float_tensors'], ())
    self.assertEqual(separate_output.measurements['float_tensors']['zeroed_count'], 0)

  def test_zero_error_client_gets_the_weight_of_the_most_accurate_client(self):
    values = _client_values(3)
    values[2][0] = np.zeros([12, 10], np.float32)  # Quantized exactly: e_i = 0.
    factory = aggregators.unweighted_clipped_quantization_mean(
      bits=4,
      clipping='octav',
      rounding='nearest',
      weighting='inverse_error',
      min_size_to_quantize=100,
    )
    output = self._run(factory, values)
    reconstructions = [_numpy_nearest_reconstruction(v[0], 4) for v in values[:2]]
    weights = np.array([1.0 / np.mean((r - v[0]) ** 2) for r, v in zip(reconstructions, values)])
    exact_weight = weights.max()
    expected = np.tensordot(weights, np.stack(reconstructions), 1) / (weights.sum() + exact_weight)
    self.assertAllClose(output.result[0], expected, rtol=1e-3, atol=1e-4)
    # Alone in its round, an exact client gets weight 1: its value comes back unchanged.
    alone = self._run(factory, values[2:])
    self.assertAllEqual(alone.result[0], np.zeros([12, 10]))

  def test_malformed_payload_never_reaches_the_mean(self):
    """A NaN error, a huge threshold or a NaN weight rejects the payload at decode, not the mean."""
    values = _client_values(3)
    factory = aggregators.clipped_quantization_mean(
      bits=4, rounding='nearest', weighting='inverse_error', min_size_to_quantize=100
    )
    encode_fn, aggregate = _encode_and_aggregate(factory)
    clean = [encode_fn(v, 0, 1.0) for v in values]
    for corrupt in (
      lambda p: p['wire'].__setitem__('errors', np.full_like(p['wire']['errors'], np.nan)),
      lambda p: p['wire']['quantized'][0].__setitem__('threshold', np.float32(3e38)),
      lambda p: p['wire']['quantized'][0].__setitem__('threshold', np.float32(-1.0)),
    ):
      payloads = [encode_fn(v, 0, 1.0) for v in values]
      corrupt(payloads[2])
      result = aggregate(payloads)
      self.assertEqual(result['rejected_malformed'], 1)
      self.assertEqual(result['accepted'], 2)
      expected = aggregate(clean[:2])
      self.assertAllClose(result['weighted_sum'][0], expected['weighted_sum'][0])
      self.assertTrue(np.all(np.isfinite(result['weight_sum'])))

  def test_malformed_payload_is_detected(self):
    plan = encoding_plan.make_plan([(5,)], bits=3)
    codes = quantization.pack_codes(tf.constant([1, 2, 3, 4, 5]), 3)
    good = [collections.OrderedDict(codes=codes, threshold=tf.constant(1.0))]
    self.assertTrue(payload.payload_is_well_formed(plan, good))
    padding_set = [collections.OrderedDict(codes=codes | (1 << 30), threshold=tf.constant(1.0))]
    self.assertFalse(payload.payload_is_well_formed(plan, padding_set))
    for threshold in (np.nan, -1.0, np.inf):
      bad = [collections.OrderedDict(codes=codes, threshold=tf.constant(threshold))]
      self.assertFalse(payload.payload_is_well_formed(plan, bad))

  def test_composes_with_weighted_and_unweighted_fed_avg(self):
    def model_fn():
      keras_model = tf.keras.Sequential(
        [tf.keras.layers.Input([4]), tf.keras.layers.Dense(3, kernel_initializer='zeros')]
      )
      return tff.learning.models.from_keras_model(
        keras_model,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        input_spec=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32)),
      )

    rng = np.random.default_rng(1)
    datasets = [
      tf.data.Dataset.from_tensor_slices(
        (rng.standard_normal([8, 4]).astype(np.float32), rng.integers(0, 3, 8).astype(np.int32))
      ).batch(4)
      for _ in range(3)
    ]
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=0.5)
    builders = [
      (
        tff.learning.algorithms.build_weighted_fed_avg,
        aggregators.clipped_quantization_mean(bits=2, min_size_to_quantize=0),
      ),
      (
        tff.learning.algorithms.build_unweighted_fed_avg,
        aggregators.unweighted_clipped_quantization_mean(bits=2, min_size_to_quantize=0),
      ),
    ]
    for builder, factory in builders:
      process = builder(model_fn, client_optimizer_fn=optimizer, model_aggregator=factory)
      state = process.initialize()
      output = process.next(state, datasets)
      measurements = output.metrics['distributor'], output.metrics['aggregator']
      self.assertEqual(measurements[1]['quantized']['accepted_clients'], 3)
      kernel = process.get_model_weights(output.state).trainable[0]
      self.assertGreater(np.abs(kernel).sum(), 0.0)

  def test_composes_inside_tff_robust_aggregators(self):
    values = _client_values(3)
    values[2] = [v * 1000.0 for v in values[2]]  # An outlier client, zeroed by its norm.
    robust = tff.aggregators.zeroing_factory(
      zeroing_norm=100.0,
      inner_agg_factory=aggregators.clipped_quantization_mean(
        bits=4, rounding='nearest', weighting='example_count', min_size_to_quantize=100
      ),
    )
    output = self._run(robust, values, [1.0, 1.0, 1.0])
    self.assertEqual(output.measurements['zeroed_count'], 1)
    self.assertLess(np.abs(output.result[0]).max(), 10.0)

  def test_inverse_normalized_error_weights_are_scale_free(self):
    values = _client_values(3)  # Client i's matrix is scaled by 1 + i.
    factory = aggregators.clipped_quantization_mean(
      bits=2,
      clipping='octav',
      rounding='nearest',
      weighting='inverse_normalized_error',
      min_size_to_quantize=100,
    )
    output = self._run(factory, values, [5.0, 1.0, 1.0])
    reconstructions = [_numpy_nearest_reconstruction(v[0], 2) for v in values]
    normalized = np.array(
      [np.mean((r - v[0]) ** 2) / np.mean(v[0] ** 2) for r, v in zip(reconstructions, values)]
    )
    weights = 1.0 / normalized
    expected = np.tensordot(weights, np.stack(reconstructions), axes=1) / weights.sum()
    self.assertAllClose(output.result[0], expected, rtol=1e-3, atol=1e-4)
    # Scaling one client's value leaves its weight unchanged (1 / e_i would shrink it 100x).
    scaled = [values[0], [values[1][0] * 10.0, values[1][1]], values[2]]
    spread = self._run(factory, scaled, [1.0, 1.0, 1.0]).measurements['quantized']
    self.assertAllClose(spread['weight_max_over_min'], weights.max() / weights.min(), rtol=1e-3)
    self.assertAllClose(spread['normalized_mse'], normalized.mean(), rtol=1e-3)
    # The normalized errors replace e_i on the wire: same upload size as 'inverse_error'.
    inverse = aggregators.clipped_quantization_mean(
      bits=2,
      clipping='octav',
      rounding='nearest',
      weighting='inverse_error',
      min_size_to_quantize=100,
    )
    self.assertEqual(
      output.measurements['quantized']['client_upload_bits'],
      self._run(inverse, values, [1.0] * 3).measurements['quantized']['client_upload_bits'],
    )

  def test_fedavg_is_example_count_weighting(self):
    factory = aggregators.clipped_quantization_mean(weighting='fedavg')
    self.assertEqual(factory.settings.weighting, 'example_count')

  def test_defaults_are_unclipped_stochastic_fedavg(self):
    weighted = aggregators.clipped_quantization_mean(bits=2).settings
    self.assertEqual(
      (weighted.clipping, weighted.rounding, weighted.weighting),
      ('max_abs', 'stochastic', 'example_count'),
    )
    self.assertEqual(
      aggregators.unweighted_clipped_quantization_mean().settings.weighting, 'uniform'
    )

  def test_mean_optimal_state_learns_the_number_of_clients(self):
    values = _client_values(4)
    factory = aggregators.clipped_quantization_mean(
      bits=2, clipping='mean_optimal', weighting='example_count', min_size_to_quantize=100
    )
    process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
    state = process.initialize()
    self.assertEqual(state['num_clients'], 1.0)
    first = process.next(state, values, [1.0, 1.0, 1.0, 1.0])
    self.assertAllClose(first.state['num_clients'], 4.0)
    self.assertAllClose(first.measurements['quantized']['effective_clients'], 4.0)
    # Unequal weights: (sum w)^2 / sum w^2 clients.
    second = process.next(first.state, values[:3], [1.0, 1.0, 2.0])
    self.assertAllClose(second.state['num_clients'], 16.0 / 6.0)
    # A round without an accepted client keeps the count.
    third = process.next(second.state, values[:2], [0.0, 0.0])
    self.assertAllClose(third.state['num_clients'], 16.0 / 6.0)
    self.assertEqual(third.state['round_seed'], 3)

  def test_mean_optimal_clips_less_with_more_clients(self):
    values = _client_values(1)
    factory = aggregators.clipped_quantization_mean(
      bits=1, clipping='mean_optimal', weighting='uniform', min_size_to_quantize=100
    )
    encode_fn, _ = _encode_and_aggregate(factory)
    thresholds = [
      float(encode_fn(values[0], 0, 1.0, k)['wire']['quantized'][0]['threshold'])
      for k in (1.0, 5.0, 30.0)
    ]
    octav = float(
      quantization.clipping_threshold(tf.constant(values[0][0]), 1, 'octav', 'stochastic')
    )
    self.assertAllClose(thresholds[0], octav, rtol=1e-5)
    self.assertLess(thresholds[0], thresholds[1])
    self.assertLess(thresholds[1], thresholds[2])
    self.assertLessEqual(thresholds[2], np.abs(values[0][0]).max() * (1 + 1e-6))

  def test_sum_form_returns_the_sum(self):
    values = _client_values(3)
    factory = aggregators.clipped_quantization_sum(
      bits=16, clipping='max_abs', rounding='nearest', min_size_to_quantize=100
    )
    output = self._run(factory, values)
    self.assertAllClose(output.result[0], np.sum([v[0] for v in values], axis=0), atol=1e-3)
    self.assertAllClose(output.result[1], np.sum([v[1] for v in values], axis=0), atol=1e-5)
    self.assertEqual(output.measurements['quantized']['accepted_clients'], 3)

  def test_rotation_composes_in_weighted_fed_avg_aggregator(self):
    """TFF's MeanFactory(HadamardTransformFactory(our sum)): the weighted mean, rotated."""
    values, weights = _client_values(3), [1.0, 2.0, 3.0]
    rotated = tff.aggregators.MeanFactory(
      value_sum_factory=tff.aggregators.HadamardTransformFactory(
        aggregators.clipped_quantization_sum(
          bits=16, clipping='max_abs', rounding='stochastic', min_size_to_quantize=100
        )
      )
    )
    output = self._run(rotated, values, weights)
    for index in range(2):
      expected = np.tensordot(weights, np.stack([v[index] for v in values]), 1) / sum(weights)
      self.assertAllClose(output.result[index], expected, atol=1e-3)
    # The quantizer sees the rotated, zero-padded tensors: 120 -> 128 entries.
    inner = output.measurements['mean_value']['hd']['quantized']
    self.assertEqual(inner['accepted_clients'], 3)
    self.assertEqual(inner['client_upload_bits'], 128 * 16 + 32 + 8 + 16 * 32)
    # At 1 bit the rotation spreads the error over every coordinate: unbiased on average.
    one_bit = tff.aggregators.MeanFactory(
      value_sum_factory=tff.aggregators.HadamardTransformFactory(
        aggregators.clipped_quantization_sum(bits=1, min_size_to_quantize=100)
      )
    )
    process = one_bit.create(VALUE_TYPE, WEIGHT_TYPE)
    state, results = process.initialize(), []
    for _ in range(40):
      output = process.next(state, values, weights)
      state = output.state
      results.append(output.result[0])
    expected = np.tensordot(weights, np.stack([v[0] for v in values]), 1) / sum(weights)
    single_error = np.mean((results[0] - expected) ** 2)
    averaged_error = np.mean((np.mean(results, axis=0) - expected) ** 2)
    self.assertLess(averaged_error, single_error / 10.0)

  def test_bad_arguments_raise_clear_errors(self):
    with self.assertRaisesRegex(ValueError, '`weighting`'):
      aggregators.clipped_quantization_mean(weighting='median')
    with self.assertRaisesRegex(ValueError, '`weighting`'):
      aggregators.unweighted_clipped_quantization_mean(weighting='example_count')
    with self.assertRaisesRegex(ValueError, '`bits`'):
      aggregators.clipped_quantization_mean(bits=17)
    with self.assertRaisesRegex(ValueError, '`bits`'):
      aggregators.clipped_quantization_mean(bits='4-x')
    with self.assertRaisesRegex(ValueError, '`clipping`'):
      aggregators.clipped_quantization_mean(clipping='percentile')
    with self.assertRaisesRegex(ValueError, '`min_size_to_quantize`'):
      aggregators.clipped_quantization_mean(min_size_to_quantize=-1)
    with self.assertRaisesRegex(TypeError, '`inner_agg_factory`'):
      aggregators.clipped_quantization_mean(inner_agg_factory=tff.aggregators.MeanFactory())
    with self.assertRaisesRegex(TypeError, 'float32'):
      aggregators.unweighted_clipped_quantization_mean().create(tff.TensorType(np.int32, [3]))
    with self.assertRaisesRegex(TypeError, 'scalar `weight_type`'):
      aggregators.clipped_quantization_mean().create(VALUE_TYPE, tff.TensorType(np.float32, [2]))


if __name__ == '__main__':
  tf.test.main()
