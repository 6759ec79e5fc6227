"""Quantized broadcast: the server sends the model to its clients through the clipq quantizer.

A `tff.learning.templates.DistributionProcess`, the downlink counterpart of the clipq aggregator,
for `tff.learning.templates.compose_learning_process`. The server encodes the trainable tensors
with the same plan as an upload (`payload.encode_tensors`: per-tensor threshold, B-bit codes
packed into int32 words, small tensors in float32), broadcasts the encoded value, and every
client decodes it. Two modes:

* 'model': the model itself is quantized each round (with stochastic rounding, unbiased).
* 'delta': the change since the clients' copy is quantized; the server keeps that copy (the
  previous round's decoded model) in its state and adds each round's decoded change to it, so the
  rounding error of one round is carried into the next round's change instead of accumulating
  (the copy tracks the model within one round's error). The clients' copy is handed to the
  clients alongside the change, standing for the copy each client keeps: this assumes every
  client holds the previous broadcast (all clients take part every round, or a catch-up not
  modelled here); only the change counts as sent.

Bits on the wire are read from the TFF type of what is sent (`download_bits_per_client`, a
measurement of every round); the non-trainable tensors (none in this project's models) travel in
float32.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.aggregators.clipped_quantization import settings as settings_lib
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload as payload_lib

BROADCASTS = ('float', 'model', 'delta')


def _decoded(plan: encoding_plan.EncodingPlan, quantized: list, floats: list) -> list[tf.Tensor]:
  """The trainable tensors, in order, from their encoded parts."""
  return plan.in_order(payload_lib.decode_quantized(plan, quantized), floats)


def build_quantized_broadcast(
  weights_type: tff.types.Type,
  bits: int,
  mode: str = 'delta',
  clipping: str = 'max_abs',
  rounding: str = 'stochastic',
  min_size_to_quantize: int = 128,
  seed: int = 0,
) -> tff.learning.templates.DistributionProcess:
  """The distributor that broadcasts the model quantized to `bits` bits per coordinate.

  Args:
    weights_type: the `tff.learning.models.ModelWeights` type of the model.
    bits: bits per coordinate of the broadcast, 1..16.
    mode: 'model' (quantize the model) or 'delta' (quantize its change since the clients' copy).
    clipping: the threshold method, as for the aggregator ('max_abs': no clipping).
    rounding: 'stochastic' (unbiased) or 'nearest'.
    min_size_to_quantize: tensors with fewer elements are sent in float32.
    seed: the first round's seed for stochastic rounding (advanced every round).
  """
  if mode not in BROADCASTS[1:]:
    raise ValueError(f'`broadcast` must be one of {BROADCASTS[1:]}. Found {mode!r}.')
  settings = settings_lib.validate_settings(
    bits, clipping, rounding, 'uniform', ('uniform',), min_size_to_quantize, False, seed
  )
  trainable_type = weights_type.trainable
  plan = settings.plan_for(trainable_type)
  delta = mode == 'delta'

  @tff.tensorflow.computation
  def initialize_fn():
    state = collections.OrderedDict(round_seed=tf.constant(seed, tf.int64))
    if delta:
      state['copy'] = [tf.zeros(t.shape, tf.float32) for t in plan.tensors]
    return state

  state_type = initialize_fn.type_signature.result

  @tff.tensorflow.computation(state_type, trainable_type)
  def encode_fn(state, trainable):
    tensors = list(trainable)
    if delta:
      tensors = [t - c for t, c in zip(tensors, state['copy'])]
    rounding_seed = tf.stack([state['round_seed'], tf.constant(1 << 20, tf.int64)])
    quantized, floats, statistics, _ = payload_lib.encode_tensors(plan, tensors, rounding_seed)
    new_state = collections.OrderedDict(round_seed=state['round_seed'] + 1)
    if delta:
      new_state['copy'] = [c + d for c, d in zip(state['copy'], _decoded(plan, quantized, floats))]
    sent = collections.OrderedDict(quantized=quantized, floats=floats)
    return new_state, sent, statistics['quantization_mse']

  sent_type = encode_fn.type_signature.result[1]
  download_bits = settings_lib.bits_of_type(sent_type) + settings_lib.bits_of_type(
    weights_type.non_trainable
  )
  copy_type = state_type['copy'] if delta else tff.to_type(())

  @tff.tensorflow.computation(sent_type, weights_type.non_trainable, copy_type)
  def decode_fn(sent, non_trainable, copy):
    tensors = _decoded(plan, sent['quantized'], sent['floats'])
    if delta:
      tensors = [c + t for c, t in zip(copy, tensors)]
    return tff.learning.models.ModelWeights(trainable=tensors, non_trainable=non_trainable)

  @tff.tensorflow.computation(encode_fn.type_signature.result[2])
  def measurements_fn(quantization_mse):
    return collections.OrderedDict(
      download_bits_per_client=tf.constant(download_bits, tf.int64),
      # The mean over quantized tensors of the broadcast's realized per-coordinate error.
      broadcast_quantization_mse=tf.reduce_mean(quantization_mse),
    )

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(initialize_fn, tff.SERVER)

  @tff.federated_computation(
    tff.FederatedType(state_type, tff.SERVER), tff.FederatedType(weights_type, tff.SERVER)
  )
  def next_fn(state, weights):
    new_state, sent, errors = tff.federated_map(encode_fn, (state, weights.trainable))
    copy = state['copy'] if delta else tff.federated_value((), tff.SERVER)
    at_clients = tff.federated_map(
      decode_fn,
      (
        tff.federated_broadcast(sent),
        tff.federated_broadcast(weights.non_trainable),
        tff.federated_broadcast(copy),
      ),
    )
    return tff.templates.MeasuredProcessOutput(
      state=new_state, result=at_clients, measurements=tff.federated_map(measurements_fn, errors)
    )

  return tff.learning.templates.DistributionProcess(init_fn, next_fn)
