"""Tests of error feedback: residuals kept per client and added to the next upload."""

import collections
import json

from absl import flags
import numpy as np
import tensorflow as tf

import learning_fixtures

from tff_clipq.aggregators.clipped_quantization import client
from tff_clipq.aggregators.clipped_quantization import measurements
from tff_clipq.aggregators.clipped_quantization import server
from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import flag_definitions
from tff_clipq.experiments import program
from tff_clipq.experiments import run_dirs
from tff_clipq.learning import error_feedback
from tff_clipq.learning import process as process_lib
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import thresholds

SHAPES = [[20, 5], [5]]


def _plan(bits=1, clipping='octav', rounding='nearest'):
  return encoding_plan.make_plan(SHAPES, bits, 10, clipping, rounding)


def _value(rng):
  return [tf.constant(rng.standard_normal(shape).astype(np.float32)) for shape in SHAPES]


def _server_mean(plan, wire, floats):
  """What the server's accumulate and finalize make of one client's payload (uniform weight)."""
  encoded = dict(
    wire=wire,
    diagnostics=collections.OrderedDict(
      clipped_fraction=tf.zeros([1]), normalized_mse=tf.zeros([1])
    ),
    float_weight=tf.constant(1.0),
    weighted_floats=floats,
  )
  accumulator = server.accumulate(
    plan, 'inverse_error', server.zero_accumulator(plan, [tf.TensorSpec([5])], True), encoded
  )
  specs = [tf.TensorSpec(shape, tf.float32) for shape in SHAPES]
  result, _ = measurements.finalize(plan, False, specs, 1, 1, accumulator, accumulator['float_sum'])
  return result


class ResidualTest(tf.test.TestCase):
  def test_residual_is_exact_on_a_fixed_sequence(self):
    rng = np.random.default_rng(0)
    plan = _plan()
    values = [_value(rng) for _ in range(5)]
    residual = [tf.zeros(shape) for shape in SHAPES]
    sent_total = [np.zeros(shape, np.float32) for shape in SHAPES]
    for round_seed, value in enumerate(values):
      new = error_feedback.next_residual(
        plan, 'inverse_error', value, residual, tf.constant(round_seed, tf.int64), 1.0
      )
      corrected = [v + e for v, e in zip(value, residual)]
      threshold = thresholds.clipping_threshold(corrected[0], 1, 'octav', 'nearest')
      quantized = quantizer.fake_quantize(corrected[0], 1, threshold, 'nearest')
      self.assertAllClose(new[0], corrected[0] - quantized, atol=1e-6)
      self.assertAllEqual(new[1], tf.zeros([5]))  # The float32 bias is sent exactly.
      # What the residual says was sent is what the server decodes.
      wire = client.encode(plan, 'inverse_error', corrected, round_seed, 1.0)['wire']
      decoded = _server_mean(plan, wire, [corrected[1]])
      self.assertAllClose(decoded[0], corrected[0] - new[0], atol=1e-6)
      sent_total = [s + d.numpy() for s, d in zip(sent_total, decoded)]
      residual = new
    # Nothing is lost: what was sent plus what is still held is what the client had.
    self.assertAllClose(
      sent_total[0] + residual[0].numpy(), np.sum([v[0] for v in values], axis=0), atol=1e-4
    )
    self.assertGreater(float(tf.reduce_max(tf.abs(residual[0]))), 0.01)

  def test_stochastic_rounding_a_budget_and_sampling_decode_as_the_server_does(self):
    rng = np.random.default_rng(1)
    value, residual = _value(rng), _value(rng)
    sampled = encoding_plan.make_plan(SHAPES, 2, 10, 'max_abs', 'stochastic', sample_fraction=0.3)
    for bits, plan in (
      (2, _plan(2, 'max_abs', 'stochastic')),
      ('budget:1.5', _plan(encoding_plan.parse_bits('budget:1.5'), 'max_abs', 'stochastic')),
      ('2, 30% of the entries', sampled),
    ):
      seed = tf.constant(4, tf.int64)
      new = error_feedback.next_residual(plan, 'inverse_error', value, residual, seed, 3.0)
      corrected = [v + e for v, e in zip(value, residual)]
      wire = client.encode(plan, 'inverse_error', corrected, seed, 3.0)['wire']
      decoded = _server_mean(plan, wire, [corrected[1]])
      self.assertAllClose(new[0], corrected[0] - decoded[0], atol=1e-5, msg=bits)
      self.assertGreater(float(tf.reduce_max(tf.abs(new[0]))), 0.01, msg=bits)

  def test_a_rejected_client_keeps_its_residual(self):
    rng = np.random.default_rng(2)
    plan = _plan()
    value, residual = _value(rng), _value(rng)
    kept = error_feedback.next_residual(plan, 'example_count', value, residual, 0, 0.0)
    for expected, actual in zip(residual, kept):
      self.assertAllEqual(actual, expected)
    broken = [tf.fill(shape, np.nan) for shape in SHAPES]
    reset = error_feedback.next_residual(plan, 'example_count', value, broken, 0, 1.0)
    for actual in reset:
      self.assertAllEqual(actual, tf.zeros_like(actual))


_client_dataset = learning_fixtures.client_dataset


def _config(**overrides):
  aggregator = overrides.pop(
    'aggregator',
    process_lib.AggregatorConfig(
      bits=1, min_size_to_quantize=10, clipping='octav', rounding='nearest'
    ),
  )
  return learning_fixtures.process_config(aggregator, **overrides)


class ErrorFeedbackProcessTest(tf.test.TestCase):
  def test_first_round_is_fedavg_and_later_rounds_use_the_residuals(self):
    datasets = [_client_dataset(i) for i in range(3)]
    for payload in process_lib.PAYLOADS:
      plain = process_lib.build_learning_process(_config(payload=payload))
      process = error_feedback.build_error_feedback_process(
        _config(payload=payload, error_feedback=True)
      )
      state = process.initialize()
      zeros = [process.zero_residual() for _ in datasets]
      output, residuals = process.next(state, datasets, zeros)
      expected = plain.next(plain.initialize(), datasets)
      tf.nest.map_structure(
        self.assertAllEqual,
        process.get_model_weights(output.state).trainable,
        plain.get_model_weights(expected.state).trainable,
      )
      self.assertLen(residuals, 3)
      kernel_residual = np.asarray(residuals[0][0])
      self.assertEqual(kernel_residual.shape, (64, 2))
      self.assertGreater(np.abs(kernel_residual).max(), 0.0, msg=payload)
      self.assertAllEqual(residuals[0][1], np.zeros(2))  # The bias travels in float32.
      second, _ = process.next(output.state, datasets, residuals)
      without, _ = process.next(output.state, datasets, zeros)
      self.assertNotAllClose(
        process.get_model_weights(second.state).trainable[0],
        process.get_model_weights(without.state).trainable[0],
      )

  def test_needs_the_clipq_aggregator_without_rotation(self):
    for aggregator in (
      process_lib.AggregatorConfig(method='float'),
      process_lib.AggregatorConfig(rotation='hadamard'),
    ):
      with self.assertRaisesRegex(ValueError, '`error_feedback`.*clipq'):
        _config(aggregator=aggregator, error_feedback=True)
    with self.assertRaisesRegex(config_lib.ConfigError, '--error_feedback.*clipq'):
      config_lib.ExperimentConfig(aggregator='tff_encoded', bits='2', error_feedback=True)


def _tiny(output_dir, **overrides):
  settings = dict(
    num_clients=4, bits='1', clipping='octav', rounding='nearest', error_feedback=True
  )
  settings.update(overrides)
  return learning_fixtures.tiny_config(output_dir, **settings)


class ErrorFeedbackProgramTest(tf.test.TestCase):
  def test_flag(self):
    flag_values = flags.FlagValues()
    flag_definitions.define_flags(flag_values)
    flag_values(['run_experiments.py', '--error_feedback'])
    self.assertTrue(config_lib.ExperimentConfig.from_flags(flag_values).error_feedback)

  def test_resume_restores_every_clients_residual(self):
    reference = program.run_experiment(_tiny(self.create_tempdir().full_path))
    self.assertTrue(reference['method'].endswith('-ef'))
    output_dir = self.create_tempdir().full_path
    program.run_experiment(_tiny(output_dir, rounds=1))
    with np.load(run_dirs.checkpoint_path(output_dir, 1)) as saved:
      self.assertLen(json.loads(str(saved['client_ids'])), 3)  # The clients of round 1.
    resumed = program.run_experiment(_tiny(output_dir, resume=True))
    drop = lambda history: [{k: v for k, v in r.items() if k != 'round_seconds'} for r in history]
    self.assertEqual(drop(resumed['history']), drop(reference['history']))
    with np.load(run_dirs.checkpoint_path(output_dir, 3)) as saved:
      client_ids = json.loads(str(saved['client_ids']))
      self.assertBetween(len(client_ids), 3, 4)
      # One model per client: a residual of every trainable tensor's shape.
      kernel, bias = saved['state_0'].shape, saved['state_1'].shape
      for k in range(len(client_ids)):
        self.assertEqual(saved[f'client_{k}_0'].shape, kernel)
        self.assertEqual(saved[f'client_{k}_1'].shape, bias)
        self.assertNotIn(f'client_{k}_2', saved.files)


if __name__ == '__main__':
  tf.test.main()
