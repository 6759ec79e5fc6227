"""The server's side of clipq, per client: check a payload, weight it, add its decoded levels.

Pure TensorFlow: `factory.py` wires these into the `tff.federated_aggregate` whose accumulate step
decodes each payload, so per-client float values never cross the wire. An accumulator holds, per
quantized tensor, the weighted sum of the levels and of the weights (exactly quantized tensors
apart, see `accumulate`), and the sums behind the measurements.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.aggregators.clipped_quantization import settings as settings_lib
from tff_clipq.quantization import budget_payload
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload as payload_lib


def statistic(weighting: str, client: dict, key: str, wire_weighting: str) -> tf.Tensor:
  """A per-tensor statistic `key`: on the wire under `wire_weighting`, else a diagnostic.

  Args:
    weighting: the factory's weighting.
    client: the client's payload, with 'wire' and 'diagnostics' parts (`client.encode`).
    key: the statistic's name in the diagnostics, e.g. 'quantization_mse' or 'normalized_mse'.
    wire_weighting: the weighting under which this statistic travels as `wire['errors']`.
  """
  if weighting == wire_weighting:
    return client['wire']['errors']
  return client['diagnostics'][key]


def client_weights(
  weighting: str, num_quantized: int, wire: dict, errors: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """(weights, exact) per quantized tensor; `exact` marks zero-error tensors (weighted later).

  Args:
    weighting: the factory's weighting.
    num_quantized: the number of quantized tensors.
    wire: the client's uploaded payload.
    errors: what an inverse-error weighting inverts (e_i, or e_i normalized); else ignored.
  """
  if weighting in settings_lib.INVERSE_ERROR_WEIGHTINGS:
    exact = tf.equal(errors, 0.0)
    return tf.where(exact, 0.0, 1.0 / tf.where(exact, 1.0, errors)), exact
  exact = tf.zeros([num_quantized], tf.bool)
  if weighting == 'example_count':
    return tf.fill([num_quantized], wire['weight']), exact
  return tf.ones([num_quantized]), exact


def well_formed(
  plan: encoding_plan.EncodingPlan,
  weighting: str,
  wire: dict,
  errors: tf.Tensor,
  weights: tf.Tensor,
) -> tf.Tensor:
  """Scalar checks only: a well-formed payload decodes to finite, finitely weighted levels.

  Args:
    plan: the value's `EncodingPlan`.
    weighting: the factory's weighting.
    wire: the client's uploaded payload.
    errors: the per-tensor errors it reported (or diagnostics), all must be finite and >= 0.
    weights: its weights per quantized tensor (`client_weights`).
  """
  # Levels lie in [-s, s], so weight x s bounds every weighted level: finite thresholds near
  # the float32 maximum could still give Inf once weighted.
  if plan.budget is not None:
    checks = [budget_payload.is_well_formed(plan, wire['quantized'])]
    checks.append(tf.reduce_all(tf.math.is_finite(weights * wire['quantized']['thresholds'])))
  else:
    checks = [payload_lib.payload_is_well_formed(plan, wire['quantized'])]
    checks += [
      tf.math.is_finite(weights[i] * tf.reduce_max(part['threshold']))
      for i, part in enumerate(wire['quantized'])
    ]
  checks.append(tf.reduce_all(tf.math.is_finite(errors)))
  checks.append(tf.reduce_all(errors >= 0.0))
  if weighting == 'example_count':
    checks.append(tf.logical_and(tf.math.is_finite(wire['weight']), wire['weight'] >= 0.0))
  return tf.reduce_all(tf.stack(checks))


def zero_accumulator(
  plan: encoding_plan.EncodingPlan, float_types: Sequence[tff.TensorType], sum_floats: bool
) -> collections.OrderedDict:
  """The empty accumulator; `float_sum` holds the float tensors' sum when `sum_floats`.

  Args:
    plan: the value's `EncodingPlan`.
    float_types: the types of the value's unquantized (float) tensors, in order.
    sum_floats: whether the accumulator sums the float tensors too (else `float_sum` is empty).
  """
  num_quantized = len(plan.quantized)
  vector = tf.zeros([num_quantized])
  return collections.OrderedDict(
    weighted_sum=[tf.zeros(t.shape) for t in plan.quantized],
    weight_sum=vector,
    exact_sum=[tf.zeros(t.shape) for t in plan.quantized],
    exact_count=vector,
    weight_min=tf.fill([num_quantized], np.float32(np.inf)),
    weight_max=vector,
    float_weight_sum=tf.constant(0.0),
    float_weight_square_sum=tf.constant(0.0),
    accepted=tf.constant(0),
    rejected_nonfinite=tf.constant(0),
    rejected_malformed=tf.constant(0),
    quantization_mse=vector,
    normalized_mse=vector,
    clipped_fraction=vector,
    clipping_threshold=vector,
    width_sum=vector,
    float_sum=[tf.zeros(t.shape) for t in float_types] if sum_floats else [],
  )


def accumulate(
  plan: encoding_plan.EncodingPlan, weighting: str, accumulator: dict, client: dict
) -> collections.OrderedDict:
  """`accumulator` plus one client's payload, decoded and weighted.

  A payload that is not accepted, or fails `well_formed`, adds nothing but its count: its levels
  are formed with zero thresholds and zero weight, and its statistics are removed with
  `tf.where`, never by multiplying with 0 (NaN * 0 is NaN). A tensor of which the client sent a
  fraction adds its levels at the coordinates its `selection_seed` selects, scaled by n / k.

  Args:
    plan: the value's `EncodingPlan`.
    weighting: the factory's weighting.
    accumulator: as from `zero_accumulator`.
    client: the aggregated parts of `client.encode`'s output (`weighted_floats` only when the
      float tensors are summed here).
  """
  num_quantized = len(plan.quantized)
  wire = client['wire']
  errors = statistic(weighting, client, 'quantization_mse', 'inverse_error')
  normalized_errors = statistic(weighting, client, 'normalized_mse', 'inverse_normalized_error')
  accepted = wire['accepted']
  weights, exact = client_weights(
    weighting,
    num_quantized,
    wire,
    normalized_errors if weighting == 'inverse_normalized_error' else errors,
  )
  checked_errors = tf.concat([errors, normalized_errors], axis=0)
  valid = tf.logical_and(accepted, well_formed(plan, weighting, wire, checked_errors, weights))
  malformed = tf.logical_and(accepted, tf.logical_not(valid))
  weights = tf.where(valid, weights, 0.0)
  exact = tf.logical_and(valid, exact)
  levels, thresholds, widths = _decoder(plan, wire, valid)

  def add_if_valid(key, values):
    return accumulator[key] + tf.where(valid, values, tf.zeros_like(values))

  float_weight = client['float_weight']
  float_weight = tf.where(
    tf.logical_and(tf.math.is_finite(float_weight), float_weight >= 0.0), float_weight, 0.0
  )
  return collections.OrderedDict(
    weighted_sum=[
      total + levels(i, weights[i]) for i, total in enumerate(accumulator['weighted_sum'])
    ],
    weight_sum=accumulator['weight_sum'] + weights,
    # A zero-error tensor is rare: tf.cond skips the full-size work for all others.
    exact_sum=[
      tf.cond(exact[i], lambda i=i, total=total: total + levels(i, 1.0), lambda total=total: total)
      for i, total in enumerate(accumulator['exact_sum'])
    ],
    exact_count=accumulator['exact_count'] + tf.cast(exact, tf.float32),
    weight_min=tf.where(
      tf.logical_and(valid, tf.logical_not(exact)),
      tf.minimum(accumulator['weight_min'], weights),
      accumulator['weight_min'],
    ),
    weight_max=tf.maximum(accumulator['weight_max'], weights),
    float_weight_sum=accumulator['float_weight_sum'] + float_weight,
    float_weight_square_sum=accumulator['float_weight_square_sum'] + tf.square(float_weight),
    accepted=accumulator['accepted'] + tf.cast(valid, tf.int32),
    rejected_nonfinite=accumulator['rejected_nonfinite']
    + tf.cast(tf.logical_not(accepted), tf.int32),
    rejected_malformed=accumulator['rejected_malformed'] + tf.cast(malformed, tf.int32),
    quantization_mse=add_if_valid('quantization_mse', errors),
    normalized_mse=add_if_valid('normalized_mse', normalized_errors),
    clipped_fraction=add_if_valid('clipped_fraction', client['diagnostics']['clipped_fraction']),
    clipping_threshold=add_if_valid(
      'clipping_threshold', tf.stack(thresholds) if thresholds else tf.zeros([0])
    ),
    width_sum=add_if_valid('width_sum', widths),
    # As the inner SumFactory would: every payload's float tensors, already weighted.
    float_sum=[
      total + value
      for total, value in zip(accumulator['float_sum'], client.get('weighted_floats', []))
    ],
  )


def _decoder(
  plan: encoding_plan.EncodingPlan, wire: dict, valid: tf.Tensor
) -> tuple[Callable[[int, tf.Tensor], tf.Tensor], list[tf.Tensor], tf.Tensor]:
  """(levels, thresholds, widths) of a client's quantized tensors.

  `levels(i, weight)` is weight x the decoded levels of quantized tensor i (zero thresholds
  unless `valid`); `thresholds` the mean threshold of each; `widths` the width of each (float32).
  """
  if plan.budget is not None:
    part = wire['quantized']
    widths, codes = budget_payload.unpack(plan, part, valid)
    sent = tf.where(valid, part['thresholds'], tf.zeros_like(part['thresholds']))
    levels = lambda i, weight: budget_payload.weighted_levels(
      plan.quantized[i], codes[i], widths[i], sent[i], weight
    )
    return (
      levels,
      tf.unstack(part['thresholds'], num=len(plan.quantized)),
      tf.cast(widths, tf.float32),
    )
  parts = [
    collections.OrderedDict(
      codes=part['codes'],
      threshold=tf.where(valid, part['threshold'], tf.zeros_like(part['threshold'])),
    )
    for part in wire['quantized']
  ]
  coordinates = [
    payload_lib.selected_coordinates(encoding, wire['selection_seed'], position)
    if encoding.sampled
    else None
    for position, encoding in enumerate(plan.quantized)
  ]
  levels = lambda i, weight: payload_lib.weighted_levels(
    plan.quantized[i], parts[i], weight, coordinates[i]
  )
  thresholds = [tf.reduce_mean(part['threshold']) for part in wire['quantized']]
  widths = tf.constant([float(t.bits) for t in plan.quantized], tf.float32, [len(parts)])
  return levels, thresholds, widths


def merge(a: dict, b: dict) -> collections.OrderedDict:
  """Two accumulators combined (sums added, weight extremes kept).

  Args:
    a: an accumulator, as from `zero_accumulator` or `accumulate`.
    b: another accumulator of the same structure.
  """
  merged = collections.OrderedDict(
    (key, tf.nest.map_structure(tf.add, a[key], b[key])) for key in a
  )
  merged['weight_min'] = tf.minimum(a['weight_min'], b['weight_min'])
  merged['weight_max'] = tf.maximum(a['weight_max'], b['weight_max'])
  return merged
