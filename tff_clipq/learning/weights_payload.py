"""The 'weights' payload: clients upload their trained weights instead of their update.

The paper's setting, in which the model itself is quantized every round. `client_work` wraps
TFF's FedAvg client work so that it returns the trained weights; `finalizer` turns the aggregated
weights back into the pseudo-gradient `current - aggregated` for TFF's server optimizer, so SGD
with learning rate 1 sets the model to the aggregate.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_federated as tff


def client_work(
  inner: tff.learning.templates.ClientWorkProcess,
  weights_type: tff.types.Type,
) -> tff.learning.templates.ClientWorkProcess:
  """Wraps FedAvg client work so that clients send trained weights instead of deltas.

  Args:
    inner: TFF's FedAvg client work (`build_model_delta_client_work`).
    weights_type: the model's `ModelWeights` type.
  """
  result_type = inner.next.type_signature.result.result.member

  @tff.tensorflow.computation(result_type, weights_type)
  def to_payload(client_result, initial_weights):
    # TFF's delta is initial - trained, so trained = initial - delta.
    update = tf.nest.map_structure(tf.subtract, initial_weights.trainable, client_result.update)
    return tff.learning.templates.ClientResult(
      update=update, update_weight=client_result.update_weight
    )

  @tff.federated_computation(
    inner.next.type_signature.parameter[0],
    inner.next.type_signature.parameter[1],
    inner.next.type_signature.parameter[2],
  )
  def next_fn(state, weights, data):
    output = inner.next(state, weights, data)
    client_result = tff.federated_map(to_payload, (output.result, weights))
    return tff.templates.MeasuredProcessOutput(output.state, client_result, output.measurements)

  return tff.learning.templates.ClientWorkProcess(
    inner.initialize, next_fn, get_hparams_fn=inner.get_hparams, set_hparams_fn=inner.set_hparams
  )


def finalizer(
  inner: tff.learning.templates.FinalizerProcess, weights_type: tff.types.Type
) -> tff.learning.templates.FinalizerProcess:
  """Turns aggregated weights into the pseudo-gradient `current - aggregated` for `inner`.

  Args:
    inner: TFF's finalizer (`build_apply_optimizer_finalizer`).
    weights_type: the model's `ModelWeights` type.
  """
  trainable_type = weights_type.trainable

  @tff.tensorflow.computation(weights_type, trainable_type)
  def pseudo_gradient(current, aggregated):
    any_accepted = tf.reduce_any(
      [tf.reduce_any(tf.not_equal(t, 0.0)) for t in tf.nest.flatten(aggregated)]
    )
    return tf.nest.map_structure(
      lambda w, a: tf.where(any_accepted, w - a, tf.zeros_like(w)), current.trainable, aggregated
    )

  @tff.federated_computation(
    inner.next.type_signature.parameter[0],
    inner.next.type_signature.parameter[1],
    inner.next.type_signature.parameter[2],
  )
  def next_fn(state, weights, aggregated):
    update = tff.federated_map(pseudo_gradient, (weights, aggregated))
    return inner.next(state, weights, update)

  return tff.learning.templates.FinalizerProcess(
    inner.initialize, next_fn, get_hparams_fn=inner.get_hparams, set_hparams_fn=inner.set_hparams
  )
