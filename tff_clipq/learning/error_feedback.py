"""Error feedback: each client adds what quantization removed from its last upload to the next.

Client i keeps a residual e_i (one model's worth of float32, zeros at first). Each round it
uploads u = v + e_i instead of its value v (update or trained weights, as the payload says)
and keeps e_i <- u - Q(u), where Q(u) is exactly what the server decodes from its payload
(EF-SGD, Karimireddy et al. 2019; Seide et al. 2014). What one round's clipping or rounding
removes is thus sent in a later round instead of being lost, so a biased quantizer (clipping,
nearest rounding) stops biasing the model.

TFF's FedAvg clients are stateless, so the residuals live in the program, keyed by client id:
`ErrorFeedbackProcess.next` takes them in beside the clients' data and returns the new ones
(a CLIENTS-placed result), and the program checkpoints them with the process state, so that
`--resume` continues exactly. Q(u) is computed at the client with the aggregator's own encoder
(`clipped_quantization.client.encode`, same round seed), then decoded as the server decodes it.
A client whose upload is rejected (weight 0, non-finite) keeps its residual.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.aggregators.clipped_quantization import client as client_lib
from tff_clipq.learning import process as process_lib
from tff_clipq.quantization import budget_payload
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload as payload_lib


def decoded_copy(plan: encoding_plan.EncodingPlan, wire: dict, tensors: list) -> list[tf.Tensor]:
  """What the server decodes from a client's `wire`: quantized tensors decoded, floats as sent.

  Args:
    plan: the value's `EncodingPlan`.
    wire: the client's payload (`client.encode(...)['wire']`).
    tensors: the client's value, whose small tensors travel in float32 unchanged.
  """
  if plan.budget is not None:
    decoded = budget_payload.decode(plan, wire['quantized'])
  else:
    decoded = payload_lib.decode_quantized(plan, wire['quantized'], wire.get('selection_seed'))
  return plan.in_order(decoded, [tensors[i] for i in plan.float_indices])


def next_residual(
  plan: encoding_plan.EncodingPlan,
  weighting: str,
  value: list,
  residual: list,
  round_seed: tf.Tensor,
  weight: tf.Tensor,
  num_clients: Any = None,
) -> list[tf.Tensor]:
  """The client's new residual: u - Q(u) for u = value + residual, or `residual` if rejected.

  Args:
    plan: the value's `EncodingPlan`.
    weighting: the aggregator's weighting (decides what the encoder sends).
    value: the client's value (float32 tensors in the plan's order).
    residual: its residual from earlier rounds (same structure).
    round_seed: the aggregator's seed of this round.
    weight: the client's weight (0 rejects it).
    num_clients: the clients averaged, for `clipping='mean_optimal'`.
  """
  corrected = [v + e for v, e in zip(value, residual)]
  wire = client_lib.encode(plan, weighting, corrected, round_seed, weight, num_clients)['wire']
  sent = decoded_copy(plan, wire, corrected)
  kept = [tf.where(tf.reduce_all(tf.math.is_finite(e)), e, tf.zeros_like(e)) for e in residual]
  return [tf.where(wire['accepted'], u - q, e) for u, q, e in zip(corrected, sent, kept)]


class ErrorFeedbackProcess(NamedTuple):
  """A learning process with error feedback; `learning_process` holds its state type.

  `next(state, client_data, residuals)` returns (LearningProcessOutput, new residuals), one
  residual list per client; `initialize`, `get_model_weights` are the learning process's.
  """

  learning_process: tff.learning.templates.LearningProcess
  next: tff.Computation
  residual_shapes: tuple[tuple[int, ...], ...]

  def initialize(self) -> Any:
    return self.learning_process.initialize()

  def get_model_weights(self, state: Any) -> Any:
    return self.learning_process.get_model_weights(state)

  def zero_residual(self) -> list[np.ndarray]:
    """A new client's residual: zeros of the model's trainable shapes."""
    return [np.zeros(shape, np.float32) for shape in self.residual_shapes]


def build_error_feedback_process(config: process_lib.ProcessConfig) -> ErrorFeedbackProcess:
  """The run's learning process (`process.build_components`), with error feedback at clients.

  Args:
    config: the run's settings, with `error_feedback` (which `ProcessConfig` allows only for
      the clipq aggregator without a rotation).
  """
  if not config.error_feedback:
    raise ValueError('`error_feedback` is off in this `ProcessConfig`.')
  components = process_lib.build_components(config)
  learning_process = tff.learning.templates.compose_learning_process(*components)
  state_type = learning_process.initialize.type_signature.result
  data_type = learning_process.next.type_signature.parameter[1]
  trainable_type = state_type.member.global_model_weights.trainable
  settings = process_lib.build_model_aggregator(config).settings
  plan = settings.plan_for(trainable_type)
  residual_type = tff.FederatedType(trainable_type, tff.CLIENTS)
  mean_aware = settings.mean_aware

  @tff.tensorflow.computation(trainable_type, trainable_type)
  def add_residual(value, residual):
    return tf.nest.map_structure(tf.add, value, residual)

  def residual(value, residual, round_seed, weight, num_clients=None):
    flat = next_residual(
      plan,
      settings.weighting,
      tf.nest.flatten(value),
      tf.nest.flatten(residual),
      round_seed,
      weight,
      num_clients,
    )
    return tf.nest.pack_sequence_as(residual, flat)

  residual_args = [trainable_type, trainable_type, np.int64, np.float32]
  if mean_aware:
    residual_fn = tff.tensorflow.computation(residual, *residual_args, np.float32)
  else:
    residual_fn = tff.tensorflow.computation(
      lambda value, residual_, round_seed, weight: residual(value, residual_, round_seed, weight),
      *residual_args,
    )

  distributor, client_work, aggregator, finalizer = components[1:]

  @tff.federated_computation(state_type, data_type, residual_type)
  def next_fn(state, client_data, residuals):
    distributor_output = distributor.next(state.distributor, state.global_model_weights)
    client_output = client_work.next(state.client_work, distributor_output.result, client_data)
    value, weight = client_output.result.update, client_output.result.update_weight
    corrected = tff.federated_map(add_residual, (value, residuals))
    residual_inputs = [value, residuals, tff.federated_broadcast(state.aggregator.round_seed)]
    residual_inputs.append(weight)
    if mean_aware:
      residual_inputs.append(tff.federated_broadcast(state.aggregator.num_clients))
    new_residuals = tff.federated_map(residual_fn, tuple(residual_inputs))
    aggregator_output = aggregator.next(state.aggregator, corrected, weight)
    finalizer_output = finalizer.next(
      state.finalizer, state.global_model_weights, aggregator_output.result
    )
    new_state = tff.federated_zip(
      tff.learning.templates.LearningAlgorithmState(
        finalizer_output.result,
        distributor_output.state,
        client_output.state,
        aggregator_output.state,
        finalizer_output.state,
      )
    )
    metrics = tff.federated_zip(
      collections.OrderedDict(
        distributor=distributor_output.measurements,
        client_work=client_output.measurements,
        aggregator=aggregator_output.measurements,
        finalizer=finalizer_output.measurements,
      )
    )
    return tff.learning.templates.LearningProcessOutput(new_state, metrics), new_residuals

  shapes = tuple(tuple(t.shape) for t in tff.structure.flatten(trainable_type))
  return ErrorFeedbackProcess(learning_process, next_fn, shapes)
