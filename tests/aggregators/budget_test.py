"""Tests of `bits='budget:X'`: each client chooses its widths within a bit budget."""

import math

from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import aggregator_fixtures

import learning_fixtures

from tff_clipq import aggregators
from tff_clipq.aggregators import clipped_quantization
from tff_clipq.aggregators.clipped_quantization import client
from tff_clipq.aggregators.clipped_quantization import server
from tff_clipq.aggregators.clipped_quantization import settings as settings_lib
from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import flag_definitions
from tff_clipq.learning import deployment
from tff_clipq.learning import process as process_lib
from tff_clipq.quantization import bit_allocation
from tff_clipq.quantization import budget_payload
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import quantizer

VALUE_TYPE = aggregator_fixtures.VALUE_TYPE
WEIGHT_TYPE = aggregator_fixtures.WEIGHT_TYPE
_client_values = aggregator_fixtures.client_values
SHAPES = [[40, 10], [10], [6, 5], [3, 4, 5]]
MAX = bit_allocation.MAX_WIDTH


def _values(seed: int) -> list[tf.Tensor]:
  rng = np.random.default_rng(seed)
  return [
    tf.constant(rng.standard_normal(shape).astype(np.float32) * scale)
    for shape, scale in zip(SHAPES, (1.0, 1.0, 0.05, 4.0))
  ]


def _plan(average: float, rounding: str = 'nearest', clipping: str = 'max_abs'):
  return encoding_plan.make_plan(SHAPES, bit_allocation.BitBudget(average), 20, clipping, rounding)


class BudgetEncodingTest(tf.test.TestCase):
  def test_plan(self):
    plan = _plan(2.5)
    self.assertEqual([t.bits for t in plan.tensors], [MAX, None, MAX, MAX])
    self.assertEqual(plan.budget_bits, int(2.5 * (400 + 30 + 60)))
    self.assertEqual(plan.budget_words, math.ceil(plan.budget_bits / 32))

  def test_decoded_tensors_are_each_quantized_at_its_width(self):
    plan = _plan(2.5)
    values = _values(0)
    part, floats, statistics, accepted = budget_payload.encode_tensors(
      plan, values, tf.constant([0, 0], tf.int64)
    )
    self.assertTrue(accepted)
    self.assertAllEqual(floats[0], values[1])
    widths = part['widths'].numpy()
    self.assertLessEqual(int(np.dot(widths, [400, 30, 60])), plan.budget_bits)
    decoded = budget_payload.decode(plan, part)
    for position, index in enumerate(plan.quantized_indices):
      value, width = values[index], int(widths[position])
      threshold = np.abs(value.numpy()).max()
      self.assertAllClose(part['thresholds'][position], threshold)
      expected = quantizer.fake_quantize(value, width, threshold, 'nearest')
      self.assertAllClose(decoded[position], expected, atol=1e-5)
      self.assertAllClose(
        statistics['quantization_mse'][position],
        np.mean((decoded[position].numpy() - value.numpy()) ** 2),
        rtol=1e-4,
        atol=1e-9,
      )
    # The small-valued [6, 5] tensor and the large [3, 4, 5] one get different widths; and the
    # allocation is the best the budget allows.
    _, errors = bit_allocation.candidate_errors(
      [tf.reshape(values[i], [-1]) for i in plan.quantized_indices], 'max_abs', 'nearest'
    )
    best = bit_allocation.best_widths(errors, [400, 30, 60], plan.budget_bits)
    self.assertAllEqual(widths, best)

  def test_stochastic_rounding_is_unbiased_over_seeds(self):
    plan = _plan(1.2, 'stochastic')
    values = _values(1)

    @tf.function
    def decoded_mean(draws):
      def one(seed):
        part, _, _, _ = budget_payload.encode_tensors(
          plan, values, tf.stack([seed, tf.constant(5, tf.int64)])
        )
        return tf.concat([tf.reshape(t, [-1]) for t in budget_payload.decode(plan, part)], 0)

      return tf.map_fn(one, tf.range(draws, dtype=tf.int64), fn_output_signature=tf.float32)

    draws = decoded_mean(2000).numpy()
    target = np.concatenate([values[i].numpy().reshape(-1) for i in plan.quantized_indices])
    spread = draws.std(axis=0, ddof=1)
    # Entries on a level (the max_abs threshold itself) decode to themselves every time.
    exact = np.all(np.abs(draws - target) < 1e-5 * (1 + np.abs(target)), axis=0)
    self.assertBetween(np.sum(exact), 3, 10)
    z = (draws.mean(axis=0) - target)[~exact] / (spread[~exact] / math.sqrt(len(draws)))
    self.assertLess(np.abs(z).max(), 5.0)
    self.assertBetween(np.mean(z**2), 0.7, 1.35)

  def test_non_finite_input_is_rejected_as_zeros(self):
    plan = _plan(2.0)
    values = _values(2)
    values[0] = tf.tensor_scatter_nd_update(values[0], [[0, 0]], [np.nan])
    part, _, statistics, accepted = budget_payload.encode_tensors(
      plan, values, tf.constant([0, 0], tf.int64)
    )
    self.assertFalse(accepted)
    self.assertAllEqual(part['codes'], np.zeros(plan.budget_words))
    self.assertAllEqual(part['thresholds'], np.zeros(3))
    self.assertAllEqual(statistics['quantization_mse'], np.zeros(3))

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, '`bits`=budget:2.*`per_channel`'):
      encoding_plan.make_plan(SHAPES, 'budget:2', 20, 'max_abs', 'nearest', per_channel=True)
    with self.assertRaisesRegex(ValueError, '`bits`=budget:2.*`sample_fraction`'):
      aggregators.clipped_quantization_mean(bits='budget:2', sample_fraction=0.5)
    with self.assertRaisesRegex(ValueError, 'budget:<average'):
      aggregators.clipped_quantization_mean(bits='budget:0.5')
    with self.assertRaisesRegex(ValueError, '`qat`.*`bits`=budget:2'):
      process_lib.ProcessConfig(qat=True, aggregator=process_lib.AggregatorConfig(bits='budget:2'))
    with self.assertRaisesRegex(ValueError, 'budget.*clipq'):
      process_lib.AggregatorConfig(method='tff_encoded', bits='budget:2')


class BudgetAggregatorTest(tf.test.TestCase):
  def test_static_wire_type_and_bits(self):
    factory = aggregators.clipped_quantization_mean(
      bits='budget:2.5', weighting='uniform', min_size_to_quantize=100
    )
    codec = clipped_quantization.build_codec(
      factory.settings, tff.aggregators.SumFactory(), VALUE_TYPE, WEIGHT_TYPE
    )
    wire_type = codec.encode_fn.type_signature.result['wire']
    self.assertEqual(wire_type['quantized']['codes'], tff.TensorType(np.int32, [10]))  # 300 bits.
    self.assertEqual(wire_type['quantized']['widths'], tff.TensorType(np.int32, [1]))
    # Codes, a width, a threshold, the accepted flag.
    self.assertEqual(settings_lib.bits_of_type(wire_type), 320 + 32 + 32 + 8)

  def test_every_weighting_averages_and_reports_the_widths(self):
    values, weights = _client_values(3), [1.0, 2.0, 3.0]
    for weighting in settings_lib.WEIGHTINGS:
      process = aggregators.clipped_quantization_mean(
        bits='budget:6', weighting=weighting, min_size_to_quantize=100, rounding='nearest'
      ).create(VALUE_TYPE, WEIGHT_TYPE)
      output = process.next(process.initialize(), values, weights)
      measured = output.measurements['quantized']
      self.assertEqual(measured['accepted_clients'], 3, msg=weighting)
      self.assertAllEqual(measured['per_tensor']['bits'], [6.0], msg=weighting)
      self.assertEqual(
        measured['client_upload_bits'],
        23 * 32
        + 32
        + 32
        + 8
        + {'inverse_error': 32, 'inverse_normalized_error': 32, 'example_count': 32, 'uniform': 0}[
          weighting
        ]
        + 10 * 32,
      )
      if weighting == 'example_count':
        expected = np.average([v[0] for v in values], axis=0, weights=weights)
        # 6 bits over [-s, s] with s <= 3 x 3.5: a step of at most 0.34.
        self.assertAllClose(output.result[0], expected, atol=0.2)

  def test_malformed_widths_are_rejected_not_decoded(self):
    plan = _plan(2.0)
    values = _values(3)
    encoded = client.encode(plan, 'uniform', values, tf.constant(1, tf.int64))
    accumulator = server.zero_accumulator(plan, [], False)
    good = server.accumulate(plan, 'uniform', accumulator, encoded)
    self.assertEqual(int(good['accepted']), 1)
    for widths in ([0, 2, 2], [MAX + 1, 1, 1], [MAX, MAX, MAX]):
      bad = tf.nest.map_structure(tf.identity, encoded)
      bad['wire']['quantized']['widths'] = tf.constant(widths, tf.int32)
      result = server.accumulate(plan, 'uniform', accumulator, bad)
      self.assertEqual(int(result['rejected_malformed']), 1, msg=widths)
      self.assertEqual(int(result['accepted']), 0)
      for total in result['weighted_sum']:
        self.assertAllEqual(total, tf.zeros_like(total))

  def test_deployment_quantizes_within_the_budget(self):
    weights = [v.numpy() for v in _values(4)]
    deployed = deployment.quantize_weights(weights, bit_allocation.BitBudget(2.0), 'max_abs', 20)
    self.assertAllEqual(deployed[1], weights[1])
    levels = [len(np.unique(deployed[i])) for i in (0, 2, 3)]
    self.assertTrue(all(1 < count <= 2**MAX for count in levels), msg=levels)
    self.assertLessEqual(np.dot([math.ceil(math.log2(c)) for c in levels], [400, 30, 60]), 980)


_client_dataset = learning_fixtures.client_dataset


class BudgetLearningProcessTest(tf.test.TestCase):
  def test_both_payloads_upload_the_bits_the_process_reports(self):
    datasets = [_client_dataset(i) for i in range(3)]
    for payload in process_lib.PAYLOADS:
      config = learning_fixtures.process_config(
        process_lib.AggregatorConfig(bits='budget:1.5', min_size_to_quantize=10), payload=payload
      )
      self.assertEqual(config.aggregator.label, 'clipq-budget1.5-max_abs-stochastic-example_count')
      process = process_lib.build_learning_process(config)
      output = process.next(process.initialize(), datasets)
      quantized = output.metrics['aggregator']['quantized']
      self.assertEqual(quantized['accepted_clients'], 3, msg=payload)
      self.assertEqual(quantized['client_upload_bits'], process_lib.upload_bits_per_client(config))
      kernel = process.get_model_weights(output.state).trainable[0]
      self.assertTrue(np.all(np.isfinite(kernel)))


class BudgetRunnerTest(tf.test.TestCase):
  def test_flag(self):
    flag_values = flags.FlagValues()
    flag_definitions.define_flags(flag_values)
    flag_values(['run_experiments.py', '--bits=budget:2.05'])
    config = config_lib.ExperimentConfig.from_flags(flag_values)
    self.assertEqual(config.aggregator_config.bits, 'budget:2.05')
    with self.assertRaisesRegex(config_lib.ConfigError, '--bits.*budget:<average'):
      config_lib.ExperimentConfig(bits='budget:0.1')
    with self.assertRaisesRegex(config_lib.ConfigError, '--bits=budget:2.*--aggregator=clipq'):
      config_lib.ExperimentConfig(bits='budget:2', aggregator='tff_encoded')
    with self.assertRaisesRegex(config_lib.ConfigError, '--qat.*--bits=budget:2'):
      config_lib.ExperimentConfig(bits='budget:2', qat=True)


if __name__ == '__main__':
  tf.test.main()
