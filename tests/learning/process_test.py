"""Tests of the learning-process builder: payload modes, baselines, bit accounting, NaN clients."""

import numpy as np
import tensorflow as tf

import learning_fixtures

from tff_clipq.learning import evaluation
from tff_clipq.learning import process as process_lib

INPUT_SHAPE = learning_fixtures.INPUT_SHAPE


_client_dataset = learning_fixtures.client_dataset


def _config(**overrides) -> process_lib.ProcessConfig:
  aggregator = overrides.pop(
    'aggregator', process_lib.AggregatorConfig(bits=2, min_size_to_quantize=0)
  )
  return learning_fixtures.process_config(aggregator, **overrides)


class LearningProcessTest(tf.test.TestCase):
  def test_both_payloads_and_all_methods_learn(self):
    datasets = [_client_dataset(i) for i in range(3)]
    test_data = _client_dataset(99)
    for payload in process_lib.PAYLOADS:
      for method in process_lib.AGGREGATORS:
        config = _config(
          payload=payload,
          aggregator=process_lib.AggregatorConfig(method=method, bits=3, min_size_to_quantize=0),
        )
        process = process_lib.build_learning_process(config)
        state = process.initialize()
        for _ in range(4):
          state = process.next(state, datasets).state
        accuracy = evaluation.evaluate(
          process, state, evaluation.build_evaluation_model(config), test_data
        )['accuracy']
        self.assertGreater(accuracy, 0.75, msg=f'{payload} {method}')

  def test_upload_bits_match_the_aggregator_measurement(self):
    for weighting in ('inverse_error', 'inverse_normalized_error', 'example_count', 'uniform'):
      config = _config(
        aggregator=process_lib.AggregatorConfig(
          bits=3, weighting=weighting, min_size_to_quantize=10
        )
      )
      process = process_lib.build_learning_process(config)
      output = process.next(process.initialize(), [_client_dataset(0)])
      measured = output.metrics['aggregator']['quantized']['client_upload_bits']
      self.assertEqual(measured, process_lib.upload_bits_per_client(config))
    float_config = _config(aggregator=process_lib.AggregatorConfig(method='float'))
    self.assertEqual(process_lib.upload_bits_per_client(float_config), 32 * (64 * 2 + 2) + 32)

  def test_nan_client_never_poisons_the_model(self):
    clean = [_client_dataset(0), _client_dataset(1)]
    for payload in process_lib.PAYLOADS:
      config = _config(payload=payload)
      process = process_lib.build_learning_process(config)
      state = process.initialize()
      with_nan = process.next(state, clean + [_client_dataset(2, poisoned=True)])
      without = process.next(state, clean)
      weights = process.get_model_weights(with_nan.state).trainable
      self.assertTrue(all(np.all(np.isfinite(w)) for w in weights))
      self.assertEqual(with_nan.metrics['aggregator']['quantized']['rejected_nonfinite_clients'], 1)
      for a, b in zip(weights, process.get_model_weights(without.state).trainable):
        self.assertAllClose(a, b, atol=1e-5)

  def test_round_with_every_client_rejected_keeps_the_model(self):
    for payload in process_lib.PAYLOADS:
      process = process_lib.build_learning_process(_config(payload=payload))
      state = process.initialize()
      output = process.next(state, [_client_dataset(0, poisoned=True)])
      for a, b in zip(
        process.get_model_weights(output.state).trainable,
        process.get_model_weights(state).trainable,
      ):
        self.assertAllEqual(a, b)

  def test_rotation_learns_and_its_upload_bits_match_the_measurement(self):
    datasets = [_client_dataset(i) for i in range(3)]
    for weighting in process_lib.ROTATION_WEIGHTINGS:
      config = _config(
        aggregator=process_lib.AggregatorConfig(
          bits=2, rotation='hadamard', weighting=weighting, min_size_to_quantize=10
        )
      )
      process = process_lib.build_learning_process(config)
      state = process.initialize()
      for _ in range(4):
        output = process.next(state, datasets)
        state = output.state
      inner = output.metrics['aggregator']['mean_value']['hd']['quantized']
      # The logistic kernel (64 x 2 = 128 entries) is padded to 128, its bias (2) to 2; plus
      # the float32 weight that TFF's MeanFactory sums.
      self.assertEqual(inner['client_upload_bits'] + 32, process_lib.upload_bits_per_client(config))
      accuracy = evaluation.evaluate(
        process, state, evaluation.build_evaluation_model(config), _client_dataset(99)
      )['accuracy']
      self.assertGreater(accuracy, 0.75, msg=weighting)

  def test_deployed_evaluation_quantizes_the_weights(self):
    datasets = [_client_dataset(i) for i in range(3)]
    config = _config(aggregator=process_lib.AggregatorConfig(bits=1, min_size_to_quantize=10))
    process = process_lib.build_learning_process(config)
    state = process.initialize()
    for _ in range(3):
      state = process.next(state, datasets).state
    keras_model = evaluation.build_evaluation_model(config)
    evaluation.assign_trainable_weights(process, state, keras_model, deployed_by=config)
    kernel, bias = (v.numpy() for v in keras_model.trainable_variables)
    # 1 bit, max_abs: every kernel entry is +-max|w|; the 2-entry bias stays float.
    float_kernel, float_bias = process.get_model_weights(state).trainable
    self.assertAllClose(np.abs(kernel), np.full_like(kernel, np.abs(float_kernel).max()))
    self.assertAllEqual(bias, float_bias)
    float_accuracy = evaluation.evaluate(process, state, keras_model, _client_dataset(99))
    deployed_16 = evaluation.evaluate(
      process,
      state,
      keras_model,
      _client_dataset(99),
      deployed_by=_config(
        aggregator=process_lib.AggregatorConfig(bits=16, min_size_to_quantize=10)
      ),
    )
    self.assertAllClose(deployed_16['loss'], float_accuracy['loss'], rtol=1e-3)

  def test_defaults_follow_the_measurements(self):
    config = process_lib.ProcessConfig()
    self.assertFalse(config.qat)
    self.assertEqual(
      (config.aggregator.clipping, config.aggregator.rounding, config.aggregator.weighting),
      ('max_abs', 'stochastic', 'example_count'),
    )
    self.assertEqual(process_lib.AggregatorConfig(weighting='fedavg').weighting, 'example_count')

  def test_invalid_settings_raise_naming_the_field(self):
    with self.assertRaisesRegex(ValueError, '`method`'):
      process_lib.AggregatorConfig(method='fp16')
    with self.assertRaisesRegex(ValueError, '`bits`'):
      process_lib.AggregatorConfig(bits=0)
    with self.assertRaisesRegex(ValueError, '`payload`'):
      _config(payload='gradients')
    with self.assertRaisesRegex(ValueError, '`client_learning_rate`'):
      _config(client_learning_rate=-0.1)
    with self.assertRaisesRegex(ValueError, '`model`'):
      process_lib.ProcessConfig(model='resnet')
    with self.assertRaisesRegex(ValueError, '`rotation`'):
      process_lib.AggregatorConfig(rotation='fourier')
    with self.assertRaisesRegex(ValueError, '`rotation` composes with weighting'):
      process_lib.AggregatorConfig(rotation='hadamard', weighting='inverse_error')
    with self.assertRaisesRegex(ValueError, '`rotation` applies to the clipq'):
      process_lib.AggregatorConfig(method='tff_encoded', bits=2, rotation='hadamard')
    with self.assertRaisesRegex(ValueError, 'mean_optimal'):
      _config(qat=True, aggregator=process_lib.AggregatorConfig(clipping='mean_optimal'))


if __name__ == '__main__':
  tf.test.main()
