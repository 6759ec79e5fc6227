"""Tests of the quantized broadcast: what clients receive, its bits, and its place in the process."""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.experiments import config as config_lib
from tff_clipq.learning import broadcast
from tff_clipq.learning import process as process_lib

SHAPES = ([20, 10], [10], [10, 3], [3])
NUM_CLIENTS = 3


def _weights(seed: int, scale: float = 1.0) -> tff.learning.models.ModelWeights:
  rng = np.random.default_rng(seed)
  return tff.learning.models.ModelWeights(
    trainable=[scale * rng.normal(size=shape).astype(np.float32) for shape in SHAPES],
    non_trainable=[],
  )


def _weights_type() -> tff.types.Type:
  return tff.to_type(
    tff.learning.models.ModelWeights(
      trainable=[tff.TensorType(np.float32, shape) for shape in SHAPES], non_trainable=[]
    )
  )


def _received(distributor, state, weights):
  """(new state, what each of NUM_CLIENTS clients received, measurements)."""
  state_type = distributor.initialize.type_signature.result.member

  @tff.federated_computation(
    tff.FederatedType(state_type, tff.SERVER),
    tff.FederatedType(_weights_type(), tff.SERVER),
    tff.FederatedType(np.int32, tff.CLIENTS),  # Sets the number of clients.
  )
  def run(state, weights, unused_clients):
    del unused_clients
    output = distributor.next(state, weights)
    return output.state, output.result, output.measurements

  return run(state, weights, [0] * NUM_CLIENTS)


def _step(values: np.ndarray, bits: int) -> float:
  """The quantizer's step for a max_abs threshold: 2 max|x| / (2^B - 1)."""
  return 2.0 * float(np.max(np.abs(values))) / (2**bits - 1)


class QuantizedBroadcastTest(tf.test.TestCase):
  def test_model_mode_sends_each_tensor_within_one_step(self):
    distributor = broadcast.build_quantized_broadcast(
      _weights_type(), bits=4, mode='model', min_size_to_quantize=50
    )
    weights = _weights(0)
    _, received, measurements = _received(distributor, distributor.initialize(), weights)
    self.assertLen(received, NUM_CLIENTS)
    for client in received:
      for value, sent, shape in zip(weights.trainable, client.trainable, SHAPES):
        if np.prod(shape) >= 50:
          self.assertLessEqual(np.max(np.abs(sent - value)), _step(value, 4) + 1e-6)
          self.assertGreater(np.max(np.abs(sent - value)), 0.0)
        else:  # Small tensors travel in float32.
          self.assertAllEqual(sent, value)
    # The one large tensor's 200 4-bit codes in 25 32-bit words and its threshold; the three
    # small tensors (43 entries) in float32.
    expected_bits = 32 * 25 + 32 + 32 * 43
    self.assertEqual(int(measurements['download_bits_per_client']), expected_bits)

  def test_delta_mode_tracks_the_model_within_one_step_of_its_change(self):
    distributor = broadcast.build_quantized_broadcast(
      _weights_type(), bits=2, mode='delta', min_size_to_quantize=0
    )
    state = distributor.initialize()
    weights = _weights(0)
    for round_num in range(4):
      previous_copy = None if round_num == 0 else [np.asarray(c) for c in state['copy']]
      state, received, _ = _received(distributor, state, weights)
      for index, value in enumerate(weights.trainable):
        change = value - (0.0 if previous_copy is None else previous_copy[index])
        sent = received[0].trainable[index]
        self.assertLessEqual(np.max(np.abs(sent - value)), _step(change, 2) + 1e-6)
        self.assertAllClose(sent, state['copy'][index], atol=1e-6)  # The server's copy.
      # A small step of the model: its change is small, so is the error of the next broadcast.
      weights = tff.learning.models.ModelWeights(
        trainable=[
          w + 0.01 * d for w, d in zip(weights.trainable, _weights(round_num + 1).trainable)
        ],
        non_trainable=[],
      )
    # After the first round only the small change is quantized: the copy is far closer than
    # one step of the whole model.
    error = max(np.max(np.abs(s - v)) for s, v in zip(received[0].trainable, weights.trainable))
    self.assertLess(error, 0.5)

  def test_stochastic_model_broadcast_is_unbiased(self):
    distributor = broadcast.build_quantized_broadcast(
      _weights_type(), bits=1, mode='model', min_size_to_quantize=0
    )
    weights = _weights(3)
    state, total, rounds = distributor.initialize(), None, 200
    for _ in range(rounds):
      state, received, _ = _received(distributor, state, weights)
      first = [np.asarray(t) for t in received[0].trainable]
      total = first if total is None else [a + b for a, b in zip(total, first)]
    for value, summed in zip(weights.trainable, total):
      # 1-bit levels are +-max|x|: the standard error of the mean is at most max|x| / sqrt(n).
      bound = 4.0 * float(np.max(np.abs(value))) / np.sqrt(rounds)
      self.assertLessEqual(np.max(np.abs(summed / rounds - value)), bound)

  def test_process_runs_with_a_quantized_broadcast_and_reports_its_bits(self):
    config = process_lib.ProcessConfig(
      model='logistic',
      input_shape=(8, 8, 1),
      num_classes=2,
      aggregator=process_lib.AggregatorConfig(bits=2, min_size_to_quantize=0),
      broadcast='delta',
      broadcast_bits=4,
    )
    process = process_lib.build_learning_process(config)
    rng = np.random.default_rng(0)
    data = [
      tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(
          x=rng.normal(size=[16, 8, 8, 1]).astype(np.float32),
          y=rng.integers(0, 2, 16).astype(np.int32),
        )
      ).batch(8)
      for _ in range(2)
    ]
    state = process.initialize()
    for _ in range(2):
      output = process.next(state, data)
      state = output.state
    distributor = output.metrics['distributor']
    # The logistic model: a 64 x 2 kernel at 4 bits (16 words) and a 2-entry bias (1 word),
    # with a threshold each.
    self.assertEqual(int(distributor['download_bits_per_client']), 32 * (16 + 1) + 2 * 32)

  def test_invalid_broadcast_settings_name_the_flag(self):
    with self.assertRaisesRegex(ValueError, '`broadcast_bits`'):
      process_lib.ProcessConfig(broadcast='model', broadcast_bits=0)
    with self.assertRaisesRegex(ValueError, '`broadcast`'):
      process_lib.ProcessConfig(broadcast='gradients')
    with self.assertRaisesRegex(config_lib.ConfigError, '--broadcast_bits'):
      config_lib.ExperimentConfig(broadcast='delta', broadcast_bits=17)


if __name__ == '__main__':
  tf.test.main()
