"""The client's side of clipq: a value encoded as the payload it uploads.

Pure TensorFlow (`factory.py` wraps it in a `tff.tensorflow.computation`): clip, quantize and pack
every large tensor (`tff_clipq.quantization.payload`, or `budget_payload` when the client chooses
its widths within a bit budget), then add what the weighting needs (the
per-tensor errors, or the example count) and the diagnostics the simulation measures.
"""

from __future__ import annotations

import collections
from typing import Optional

import tensorflow as tf

from tff_clipq.quantization import budget_payload
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload as payload_lib


def encode(
  plan: encoding_plan.EncodingPlan,
  weighting: str,
  value,
  round_seed: tf.Tensor,
  client_weight: Optional[tf.Tensor] = None,
  num_clients: Optional[tf.Tensor] = None,
) -> collections.OrderedDict:
  """One client's payload: OrderedDict(wire, diagnostics, float_weight, weighted_floats).

  Args:
    plan: the value's `EncodingPlan`.
    weighting: the factory's weighting; decides what the wire carries besides codes.
    value: the client's value (a structure of float tensors in the plan's order).
    round_seed: the round's seed (int64 scalar), mixed with the client's data.
    client_weight: the client's weight (weighted factories): weight 0, negative or non-finite
      rejects the client (TFF's FedAvg client work gives a non-finite update weight 0).
    num_clients: clients the server averages (for `clipping='mean_optimal'`), else None.

  `wire` is what is uploaded: per quantized tensor its packed codes and threshold (with a bit
  budget: one OrderedDict(codes, widths, thresholds) for all of them), the accepted
  flag, 'selection_seed' when the plan sends a fraction of each tensor (the int32 from which the
  server derives the coordinates sent), and 'errors' (inverse-error weightings) or 'weight'
  (example_count). `diagnostics` holds the per-tensor statistics the wire does not already carry.
  """
  tensors = [tf.cast(t, tf.float32) for t in tf.nest.flatten(value)]
  takes_part = None
  if client_weight is not None:
    weight = tf.cast(client_weight, tf.float32)
    takes_part = tf.logical_and(tf.math.is_finite(weight), weight > 0.0)
  seed = payload_lib.client_seed(round_seed, tensors)
  selection = payload_lib.selection_seed(seed) if plan.sampled else None
  if plan.budget is not None:
    quantized, floats, statistics, accepted = budget_payload.encode_tensors(
      plan, tensors, seed, takes_part, num_clients
    )
  else:
    quantized, floats, statistics, accepted = payload_lib.encode_tensors(
      plan, tensors, seed, takes_part, num_clients, selection
    )
  wire = collections.OrderedDict(quantized=quantized, accepted=accepted)
  if plan.sampled:
    wire['selection_seed'] = tf.where(accepted, selection, 0)
  float_weight = tf.cast(accepted, tf.float32)
  if weighting == 'inverse_error':
    wire['errors'] = statistics['quantization_mse']
  elif weighting == 'inverse_normalized_error':
    wire['errors'] = statistics['normalized_mse']
  elif weighting == 'example_count':
    wire['weight'] = tf.where(accepted, weight, 0.0)
    float_weight = wire['weight']
  diagnostics = collections.OrderedDict(clipped_fraction=statistics['clipped_fraction'])
  if weighting != 'inverse_normalized_error':
    diagnostics['normalized_mse'] = statistics['normalized_mse']
  if weighting != 'inverse_error':
    diagnostics['quantization_mse'] = statistics['quantization_mse']
  return collections.OrderedDict(
    wire=wire,
    diagnostics=diagnostics,
    float_weight=float_weight,
    weighted_floats=[f * float_weight for f in floats],
  )
