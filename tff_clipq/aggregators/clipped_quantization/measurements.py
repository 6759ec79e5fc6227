"""The end of a clipq round at the server: the mean (or sum) and what the process reports.

Bits on the wire are read from the TFF type of the payload (`client_upload_bits`); the error
statistics are means over the accepted clients, per tensor and weighted by tensor size overall.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from tff_clipq.quantization import encoding_plan


def finalize(
  plan: encoding_plan.EncodingPlan,
  sum_result: bool,
  value_specs: Any,
  client_upload_bits: int,
  diagnostic_bits: int,
  accumulator: dict,
  float_sums: Optional[Any],
) -> tuple[Any, collections.OrderedDict]:
  """(result in the value's structure, measurements) from a round's accumulator.

  Args:
    plan: the value's `EncodingPlan`.
    sum_result: return the weighted sums (the sum form) instead of the means.
    value_specs: the value's `tf.TensorSpec` structure, which the result takes.
    client_upload_bits: bits one client uploads (from the payload's TFF type).
    diagnostic_bits: bits of the diagnostics the simulation also gathers per client.
    accumulator: the round's `server.accumulate` total.
    float_sums: the weighted sums of the float tensors (the accumulator's own `float_sum` when
      they were summed there, else the inner factory's result).
  """
  # A zero-error client (its tensor was exactly representable, e.g. all zeros) counts with the
  # weight of the round's most accurate other client: finite, and never dominating.
  exact_weight = tf.where(accumulator['weight_max'] > 0.0, accumulator['weight_max'], 1.0)
  # The sum form divides by nothing (its weights are 1 or 0, and nothing is exact).
  divide = (lambda total, _: total) if sum_result else tf.math.divide_no_nan
  means = [
    divide(
      total + exact_weight[i] * accumulator['exact_sum'][i],
      accumulator['weight_sum'][i] + exact_weight[i] * accumulator['exact_count'][i],
    )
    for i, total in enumerate(accumulator['weighted_sum'])
  ]
  float_means = [
    divide(total, accumulator['float_weight_sum'])
    for total in (tf.nest.flatten(float_sums) if float_sums is not None else [])
  ]
  ordered = [None] * len(plan.tensors)
  for index, mean in zip(plan.quantized_indices, means):
    ordered[index] = mean
  for index, mean in zip(plan.float_indices, float_means):
    ordered[index] = mean
  result = tf.nest.pack_sequence_as(value_specs, ordered)

  quantized_sizes = np.array([t.num_elements for t in plan.quantized], np.float32)
  accepted = tf.cast(accumulator['accepted'], tf.float32)
  participants = (
    accumulator['accepted'] + accumulator['rejected_nonfinite'] + accumulator['rejected_malformed']
  )
  per_tensor_mean = lambda key: tf.math.divide_no_nan(accumulator[key], accepted)
  coordinate_weights = quantized_sizes / max(float(quantized_sizes.sum()), 1.0)
  summary = lambda values: tf.reduce_sum(values * coordinate_weights)
  spread = tf.where(
    accumulator['weight_max'] > 0.0,
    tf.math.divide_no_nan(accumulator['weight_max'], accumulator['weight_min']),
    tf.zeros_like(accumulator['weight_max']),
  )
  measurements = collections.OrderedDict(
    bits_per_coordinate=tf.constant(client_upload_bits / plan.num_coordinates, tf.float32),
    client_upload_bits=tf.constant(client_upload_bits, tf.int64),
    round_upload_bits=tf.cast(participants, tf.int64) * client_upload_bits,
    compression_ratio=tf.constant(32.0 * plan.num_coordinates / client_upload_bits, tf.float32),
    diagnostic_bits_per_client=tf.constant(diagnostic_bits, tf.int64),
    accepted_clients=accumulator['accepted'],
    # (sum w)^2 / sum w^2: the number of equally weighted clients whose mean would have the
    # same rounding-noise variance (the float tensors' weights; 0 if none was accepted).
    effective_clients=tf.math.divide_no_nan(
      tf.square(accumulator['float_weight_sum']), accumulator['float_weight_square_sum']
    ),
    rejected_nonfinite_clients=accumulator['rejected_nonfinite'],
    rejected_malformed_clients=accumulator['rejected_malformed'],
    quantization_mse=summary(per_tensor_mean('quantization_mse')),
    normalized_mse=summary(per_tensor_mean('normalized_mse')),
    clipped_fraction=summary(per_tensor_mean('clipped_fraction')),
    weight_max_over_min=tf.reduce_max(tf.concat([spread, [0.0]], axis=0)),
    per_tensor=collections.OrderedDict(
      # With a bit budget, the mean of the widths the accepted clients chose.
      bits=per_tensor_mean('width_sum')
      if plan.budget is not None
      else tf.constant([t.bits for t in plan.quantized] or np.zeros([0]), tf.float32),
      clipping_threshold=per_tensor_mean('clipping_threshold'),
      quantization_mse=per_tensor_mean('quantization_mse'),
      normalized_mse=per_tensor_mean('normalized_mse'),
      clipped_fraction=per_tensor_mean('clipped_fraction'),
      weight_max_over_min=spread,
    ),
  )
  return result, measurements
