"""Tests of `sample_fraction`: clients send a uniformly chosen fraction of each quantized tensor."""

import dataclasses
import math
import os

from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import aggregator_fixtures

import learning_fixtures

from tff_clipq import aggregators
from tff_clipq.aggregators import clipped_quantization
from tff_clipq.aggregators.clipped_quantization import client
from tff_clipq.aggregators.clipped_quantization import measurements
from tff_clipq.aggregators.clipped_quantization import server
from tff_clipq.aggregators.clipped_quantization import settings as settings_lib
from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import flag_definitions
from tff_clipq.experiments import outputs
from tff_clipq.experiments import run_dirs
from tff_clipq.learning import process as process_lib
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload

MATRIX = aggregator_fixtures.MATRIX
BIAS = aggregator_fixtures.BIAS
VALUE_TYPE = aggregator_fixtures.VALUE_TYPE
WEIGHT_TYPE = aggregator_fixtures.WEIGHT_TYPE
_client_values = aggregator_fixtures.client_values


def _decoded_means(
  plan: encoding_plan.EncodingPlan,
  weighting: str,
  values: list[np.ndarray],
  weights: list[float],
  draws: int,
) -> np.ndarray:
  """The server's mean of one tensor per client, for round seeds 0..draws-1 ([draws, ...]).

  Runs the aggregator's own client encode, server accumulate and finalize in one TF graph.
  """
  shape = values[0].shape

  @tf.function
  def run():
    def one_round(round_seed):
      accumulator = server.zero_accumulator(plan, [], False)
      for value, weight in zip(values, weights):
        encoded = client.encode(
          plan, weighting, [tf.constant(value)], round_seed, tf.constant(weight)
        )
        accumulator = server.accumulate(plan, weighting, accumulator, encoded)
      result, _ = measurements.finalize(
        plan, False, [tf.TensorSpec(shape, tf.float32)], 1, 1, accumulator, []
      )
      return result[0]

    return tf.map_fn(
      one_round,
      tf.range(draws, dtype=tf.int64),
      fn_output_signature=tf.TensorSpec(shape, tf.float32),
    )

  return run().numpy()


class SampledEncodingTest(tf.test.TestCase):
  def test_decoded_mean_is_unbiased_at_one_bit(self):
    """1 bit, stochastic rounding, f = 0.25: the mean over 2,000 rounds is the true mean."""
    rng = np.random.default_rng(3)
    values = [
      rng.standard_normal([16, 16]).astype(np.float32),
      (0.5 * rng.standard_normal([16, 16]) + 0.3).astype(np.float32),
    ]
    weights = [1.0, 3.0]
    expected = (weights[0] * values[0] + weights[1] * values[1]) / sum(weights)
    plan = encoding_plan.make_plan(
      [[16, 16]], 1, 0, 'max_abs', 'stochastic', per_channel=False, sample_fraction=0.25
    )
    self.assertEqual(plan.tensors[0].sent, 64)
    for weighting in ('example_count', 'uniform'):
      target = expected if weighting == 'example_count' else np.mean(values, axis=0)
      draws = _decoded_means(plan, weighting, values, weights, 2000)
      # Each client sent 64 of 256 entries: at least half of every round's mean is zero.
      self.assertGreaterEqual(np.sum(draws[0] == 0.0), 128)
      standard_error = draws.std(axis=0, ddof=1) / math.sqrt(len(draws))
      z = (draws.mean(axis=0) - target) / standard_error
      self.assertLess(np.abs(z).max(), 5.0, msg=weighting)
      # Over 256 coordinates the squared z-scores average to 1 (sd 0.09) when unbiased.
      self.assertBetween(np.mean(z**2), 0.7, 1.35, msg=weighting)

  def test_errors_and_threshold_are_those_of_the_sent_entries(self):
    x = np.random.default_rng(0).standard_normal([40, 10]).astype(np.float32)
    plan = encoding_plan.make_plan([[40, 10]], 2, 0, 'max_abs', 'nearest', sample_fraction=0.1)
    encoded = client.encode(plan, 'inverse_error', [tf.constant(x)], tf.constant(7, tf.int64))
    wire = encoded['wire']
    coordinates = payload.selected_coordinates(plan.tensors[0], wire['selection_seed'], 0)
    self.assertLen(np.unique(coordinates.numpy()), 40)
    sent = x.reshape(-1)[coordinates.numpy()]
    self.assertAllClose(wire['quantized'][0]['threshold'], np.abs(sent).max())
    decoded = payload.decode_quantized(plan, wire['quantized'], wire['selection_seed'])[0]
    levels = decoded.numpy().reshape(-1)[coordinates.numpy()] / 10.0  # Scaled by n / k = 10.
    self.assertAllClose(wire['errors'][0], np.mean((levels - sent) ** 2), rtol=1e-4)
    others = np.ones(400, bool)
    others[coordinates.numpy()] = False
    self.assertAllEqual(decoded.numpy().reshape(-1)[others], np.zeros(360))
    # The server's weighted levels are the decoded tensor, weighted.
    weighted = payload.weighted_levels(plan.tensors[0], wire['quantized'][0], 2.0, coordinates)
    self.assertAllClose(weighted, 2.0 * decoded, atol=1e-5)

  def test_sent_entries(self):
    self.assertEqual(
      encoding_plan.sent_entries(30, 0.1), 3
    )  # Not 4 from 0.1 * 30 = 3.0000000000000004.
    self.assertEqual(encoding_plan.sent_entries(10, 0.01), 1)
    self.assertEqual(encoding_plan.sent_entries(10, 0.95), None)  # ceil(9.5) = 10: all of them.
    self.assertEqual(encoding_plan.sent_entries(10, 1.0), None)


class SampledAggregatorTest(tf.test.TestCase):
  def test_wire_bits_are_the_sent_codes_plus_overhead(self):
    for bits, fraction in ((1, 0.25), (4, 0.4), (3, 0.1), (2, 0.05)):
      factory = aggregators.clipped_quantization_mean(
        bits=bits, weighting='uniform', min_size_to_quantize=100, sample_fraction=fraction
      )
      codec = clipped_quantization.build_codec(
        factory.settings, tff.aggregators.SumFactory(), VALUE_TYPE, WEIGHT_TYPE
      )
      sent = max(1, math.ceil(round(fraction * 120, 9)))
      wire_type = codec.encode_fn.type_signature.result['wire']
      self.assertEqual(wire_type['selection_seed'], tff.TensorType(np.int32))
      words = -(-sent * bits // 32)
      self.assertEqual(wire_type['quantized'][0]['codes'].shape, (words,))
      # Codes (k B bits, padded to whole int32 words), threshold, int32 seed, accepted flag.
      self.assertEqual(settings_lib.bits_of_type(wire_type), 32 * words + 32 + 32 + 8)
    # 48 codes x 4 bits fill 6 words exactly: k B + overhead, and the bias in float32.
    factory = aggregators.clipped_quantization_mean(
      bits=4, weighting='uniform', min_size_to_quantize=100, sample_fraction=0.4
    )
    process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
    output = process.next(process.initialize(), _client_values(2), [1.0, 1.0])
    measured = output.measurements['quantized']
    self.assertEqual(measured['client_upload_bits'], 48 * 4 + 32 + 32 + 8 + 10 * 32)
    self.assertAllClose(measured['bits_per_coordinate'], (48 * 4 + 72 + 320) / 130)
    # Below a bit per coordinate when the quantized tensors dominate.
    big = tff.TensorType(np.float32, [100, 100])
    process = aggregators.clipped_quantization_mean(bits=1, sample_fraction=0.1).create(
      big, WEIGHT_TYPE
    )
    value = np.ones([100, 100], np.float32)
    measured = process.next(process.initialize(), [value], [1.0]).measurements['quantized']
    # 1,000 codes in 32 words, threshold, seed, accepted flag and the example count.
    self.assertEqual(measured['client_upload_bits'], 32 * 32 + 32 + 32 + 8 + 32)
    self.assertLess(measured['bits_per_coordinate'], 0.12)

  def test_fraction_one_is_the_default_bit_for_bit(self):
    factories = (
      (aggregators.clipped_quantization_mean, dict(weighting='example_count')),
      (aggregators.unweighted_clipped_quantization_mean, dict(weighting='inverse_error')),
      (aggregators.clipped_quantization_sum, dict()),
    )
    for build, arguments in factories:
      default = build(bits=2, min_size_to_quantize=100, **arguments)
      explicit = build(bits=2, min_size_to_quantize=100, sample_fraction=1.0, **arguments)
      self.assertEqual(default.settings, explicit.settings)
      self.assertFalse(explicit.settings.plan_for(VALUE_TYPE).sampled)
    values, weights = _client_values(3), [1.0, 2.0, 3.0]
    outputs = []
    for factory in (
      aggregators.clipped_quantization_mean(bits=1, min_size_to_quantize=100),
      aggregators.clipped_quantization_mean(bits=1, min_size_to_quantize=100, sample_fraction=1),
    ):
      process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
      state, results = process.initialize(), []
      for _ in range(2):
        output = process.next(state, values, weights)
        state = output.state
        results.append((output.result, output.measurements))
      outputs.append((str(process.next.type_signature), results))
    self.assertEqual(outputs[0][0], outputs[1][0])
    for (result_a, measured_a), (result_b, measured_b) in zip(outputs[0][1], outputs[1][1]):
      for a, b in zip(result_a, result_b):
        self.assertAllEqual(a, b)
      tf.nest.map_structure(self.assertAllEqual, measured_a, measured_b)

  def test_every_weighting_and_the_rotation_compose(self):
    values, weights = _client_values(3), [1.0, 2.0, 3.0]
    for weighting in settings_lib.WEIGHTINGS:
      factory = aggregators.clipped_quantization_mean(
        bits=1, weighting=weighting, min_size_to_quantize=100, sample_fraction=0.25
      )
      process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
      output = process.next(process.initialize(), values, weights)
      self.assertEqual(output.measurements['quantized']['accepted_clients'], 3, msg=weighting)
      kernel = output.result[0]
      self.assertTrue(np.all(np.isfinite(kernel)))
      # Three clients sent 30 of 120 entries each: the others are zero.
      self.assertBetween(np.count_nonzero(kernel), 30, 90, msg=weighting)
    rotated = tff.aggregators.MeanFactory(
      value_sum_factory=tff.aggregators.HadamardTransformFactory(
        aggregators.clipped_quantization_sum(bits=1, min_size_to_quantize=100, sample_fraction=0.25)
      )
    )
    process = rotated.create(VALUE_TYPE, WEIGHT_TYPE)
    output = process.next(process.initialize(), values, weights)
    inner = output.measurements['mean_value']['hd']['quantized']
    self.assertEqual(inner['accepted_clients'], 3)
    # 120 entries padded to 128, of which 32 are sent at 1 bit; the 10-entry bias is padded to 16.
    self.assertEqual(inner['client_upload_bits'], 32 + 32 + 32 + 8 + 16 * 32)
    self.assertTrue(np.all(np.isfinite(output.result[0])))

  def test_bad_fractions_raise_naming_the_argument(self):
    for build in (
      aggregators.clipped_quantization_mean,
      aggregators.unweighted_clipped_quantization_mean,
      aggregators.clipped_quantization_sum,
    ):
      for bad in (0, 0.0, 1.5, float('nan'), -0.25, float('inf'), True, '0.5'):
        with self.assertRaisesRegex(ValueError, '`sample_fraction`.*\\(0, 1\\]'):
          build(sample_fraction=bad)
      with self.assertRaisesRegex(ValueError, '`sample_fraction`.*`per_channel`'):
        build(sample_fraction=0.5, per_channel=True)
      build(per_channel=True, sample_fraction=1.0)
    with self.assertRaisesRegex(ValueError, '`sample_fraction`'):
      process_lib.AggregatorConfig(sample_fraction=0.0)
    with self.assertRaisesRegex(ValueError, '`sample_fraction`.*clipq'):
      process_lib.AggregatorConfig(method='tff_encoded', bits=1, sample_fraction=0.5)


class SampledRunnerTest(tf.test.TestCase):
  def test_flag_reaches_the_aggregator(self):
    flag_values = flags.FlagValues()
    flag_definitions.define_flags(flag_values)
    flag_values(['run_experiments.py', '--sample_fraction=0.25', '--bits=1'])
    config = config_lib.ExperimentConfig.from_flags(flag_values)
    self.assertEqual(config.aggregator_config.sample_fraction, 0.25)
    self.assertEqual(
      config.aggregator_config.label, 'clipq-1b-max_abs-stochastic-example_count-sample0.25'
    )
    self.assertEqual(config_lib.ExperimentConfig().aggregator_config.sample_fraction, 1.0)
    runs = config_lib.ExperimentConfig(sweep='bits=1; bits=1,sample_fraction=0.1').sweep_runs()
    self.assertEqual([c.sample_fraction for _, c in runs], [1.0, 0.1])

  def test_bad_values_name_the_flag(self):
    for bad in (0.0, 1.5, float('nan')):
      with self.assertRaisesRegex(config_lib.ConfigError, '--sample_fraction must be a number'):
        config_lib.ExperimentConfig(sample_fraction=bad)
    with self.assertRaisesRegex(config_lib.ConfigError, '--sample_fraction.*--per_channel'):
      config_lib.ExperimentConfig(sample_fraction=0.5, per_channel=True)
    with self.assertRaisesRegex(config_lib.ConfigError, '--sample_fraction.*--aggregator=clipq'):
      config_lib.ExperimentConfig(aggregator='float', sample_fraction=0.5)
    with self.assertRaisesRegex(config_lib.ConfigError, '--sweep run .*--sample_fraction'):
      config_lib.ExperimentConfig(sweep='sample_fraction=2')

  def test_a_run_stored_without_the_setting_resumes_with_its_default(self):
    run_dir = self.create_tempdir().full_path
    config = config_lib.ExperimentConfig(output_dir=run_dir, resume=True)
    stored = run_dirs.config_dict(config)
    del stored['sample_fraction']  # Written before the setting existed.
    for name in (run_dirs.STUDY_JSON, run_dirs.CONFIG_JSON):
      outputs.write_json(os.path.join(run_dir, name), stored)
    run_dirs.check_output_dir(config, [('old', config)])
    with self.assertRaisesRegex(config_lib.ConfigError, '--sample_fraction=1.0 \\(now 0.5\\)'):
      run_dirs.check_output_dir(config, [('old', dataclasses.replace(config, sample_fraction=0.5))])


_client_dataset = learning_fixtures.client_dataset


class SampledLearningProcessTest(tf.test.TestCase):
  def test_one_round_with_and_without_rotation(self):
    datasets = [_client_dataset(i) for i in range(3)]
    for rotation in process_lib.ROTATIONS:
      config = learning_fixtures.process_config(
        process_lib.AggregatorConfig(
          bits=1, min_size_to_quantize=10, rotation=rotation, sample_fraction=0.25
        )
      )
      process = process_lib.build_learning_process(config)
      state = process.initialize()
      output = process.next(state, datasets)
      aggregator = output.metrics['aggregator']
      if rotation == 'none':
        quantized = aggregator['quantized']
        overhead = 0
      else:
        quantized = aggregator['mean_value']['hd']['quantized']
        overhead = 32  # The float32 weight TFF's MeanFactory sums.
      self.assertEqual(quantized['accepted_clients'], 3)
      # The 128-entry kernel sends 32 codes at 1 bit; the bias travels in float32.
      self.assertEqual(
        quantized['client_upload_bits'] + overhead, process_lib.upload_bits_per_client(config)
      )
      self.assertLess(quantized['bits_per_coordinate'], 3.5)
      kernel = process.get_model_weights(output.state).trainable[0]
      self.assertTrue(np.all(np.isfinite(kernel)))
      self.assertGreater(np.count_nonzero(kernel), 0)


if __name__ == '__main__':
  tf.test.main()
