"""Mean of client values sent as clipped, uniformly quantized, bit-packed tensors.

Each client clips every large tensor of its value at a threshold (MSE-optimal by default),
quantizes it to B bits with nearest or stochastic rounding and packs the codes into int32 words.
The upload payload is: per quantized tensor the packed codes and the float32 threshold, plus
what the weighting needs (the per-tensor quantization errors e_i for inverse-error weighting, the
example count for FedAvg weighting, nothing for uniform weighting), one bool saying whether the
client takes part, and the small float32 tensors. Bits on the wire (`client_upload_bits`) are read
from the TFF type of that payload, not estimated. For its measurements this simulation also
gathers per-tensor diagnostics from each client (normalized MSE, clipped fraction, and e_i when
the weighting does not send it); they are counted separately (`diagnostic_bits_per_client`), and
a deployment would not send them.

The server decodes each payload inside `tff.federated_aggregate`'s accumulate step, so per-client
float values never cross the wire, and forms per tensor the weighted mean
sum_i w_i x_i / sum_i w_i with

  * 'inverse_error': w_i = 1 / e_i (Bozorgasl & Chen 2024): clients never reveal their example
    counts. A tensor quantized exactly (e_i = 0, e.g. all zeros) gets the weight of the round's
    most accurate other client for that tensor (or 1 if there is none): finite, never dominant;
  * 'inverse_normalized_error': w_i = 1 / (e_i / mean(x_i^2)), the scale-free variant: e_i grows
    with the size of a client's value, so 1 / e_i down-weights the clients whose updates move
    most; the normalized error does not. Same wire size and privacy as 'inverse_error';
  * 'example_count' (alias 'fedavg'): w_i = the client's weight (FedAvg);
  * 'uniform': w_i = 1.

With `clipping='mean_optimal'` the clients clip at the threshold that minimizes the error of the
mean of K clients (`tff_clipq.quantization.clipping_threshold`): K is learned by the process, as
TFF's adaptive factories learn their norms: its state holds the effective number of clients of
the last round's mean, (sum w)^2 / sum w^2 of the weights the float tensors are averaged with
(1 before the first round), and broadcasts it with the round's seed.

Tensors smaller than `min_size_to_quantize` (biases) stay float32; they are weighted by the
example count ('example_count') or uniformly (otherwise, since their error is zero), multiplied
by the weight at the client and summed by `inner_agg_factory` (default `tff.aggregators.SumFactory`),
the way `tff.aggregators.MeanFactory` composes with its inner sum factories. A plain `SumFactory`
(stateless, no measurements) is carried out inside the quantized tensors' `federated_aggregate`
instead of as a second aggregation: the same sums, types and measurements, one less per-client
step in TFF's runtime.

A client whose value holds NaN or Inf, or (weighted factory) whose weight is not positive, is
rejected at the client: it sends zeros and a cleared flag. Weight 0 is how TFF's FedAvg client
work marks a client whose update was non-finite, so such clients never enter an average that
ignores weights. A payload that fails the server's checks (a non-finite or negative threshold,
error or weight, a set padding bit, a weight x threshold that overflows) is rejected at decode:
it decodes with zero thresholds and zero weights, and its statistics are removed with
`tf.where`, so even a NaN in a rejected payload cannot reach the mean.
Both kinds are counted in the measurements. The small float32 tensors go to `inner_agg_factory`
before the server sees the payload, so they cannot be checked at decode; a client that is
rejected at the client sends them as zeros. A round in which every client is rejected yields
zeros, like `MeanFactory(no_nan_division=True)`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.quantization import payload as payload_lib

WEIGHTINGS = ('inverse_error', 'inverse_normalized_error', 'example_count', 'uniform')
UNWEIGHTED_WEIGHTINGS = ('inverse_error', 'inverse_normalized_error', 'uniform')
# Other names users type for a weighting.
WEIGHTING_ALIASES = {'fedavg': 'example_count'}
# Weightings whose clients send a per-tensor error (1 / error is the weight).
INVERSE_ERROR_WEIGHTINGS = ('inverse_error', 'inverse_normalized_error')


@dataclasses.dataclass(frozen=True)
class QuantizationSettings:
  """Validated settings shared by the weighted and unweighted factories."""

  bits: payload_lib.BitsSpec
  clipping: Union[str, float]
  rounding: str
  weighting: str
  min_size_to_quantize: int
  per_channel: bool
  seed: int
  sum_result: bool = False  # The sum form: weighted sum, not divided by the weights' sum.

  @property
  def mean_aware(self) -> bool:
    """Whether clients need the number of clients averaged (the process learns it)."""
    return self.clipping == 'mean_optimal'

  def plan_for(self, value_type: tff.types.Type) -> payload_lib.EncodingPlan:
    shapes = [tuple(t.shape) for t in _flat_tensor_types(value_type)]
    return payload_lib.make_plan(
        shapes, self.bits, self.min_size_to_quantize, self.clipping, self.rounding, self.per_channel
    )


def _flat_tensor_types(value_type: tff.types.Type) -> list[tff.types.TensorType]:
  if isinstance(value_type, tff.types.TensorType):
    return [value_type]
  return list(tff.structure.flatten(value_type))


def _check_value_type(value_type: tff.types.Type) -> None:
  if not isinstance(value_type, (tff.types.TensorType, tff.types.StructType)):
    raise TypeError(
        f'Expected `value_type` to be a tff.TensorType or tff.StructType. Found {value_type}.'
    )
  for tensor_type in _flat_tensor_types(value_type):
    if not isinstance(tensor_type, tff.types.TensorType) or tensor_type.dtype != np.float32:
      raise TypeError(
          f'Expected `value_type` to hold only float32 tensors. Found {tensor_type} in {value_type}.'
      )
    if not tff.types.is_shape_fully_defined(tensor_type.shape):
      raise TypeError(f'Expected fully defined tensor shapes. Found {tensor_type} in {value_type}.')


def _bits_of_type(type_spec: tff.types.Type) -> int:
  """Bits needed to transmit a value of `type_spec` (bool counts 8 bits, as TF stores it)."""
  total = 0
  for tensor_type in _flat_tensor_types(type_spec):
    elements = tff.types.num_elements_in_shape(tensor_type.shape)
    total += elements * np.dtype(tensor_type.dtype).itemsize * 8
  return total


def _validate_settings(
    bits, clipping, rounding, weighting, allowed_weightings, min_size_to_quantize, per_channel,
    seed, sum_result=False,
) -> QuantizationSettings:
  weighting = WEIGHTING_ALIASES.get(weighting, weighting)
  if weighting not in allowed_weightings:
    raise ValueError(f'`weighting` must be one of {allowed_weightings}. Found {weighting!r}.')
  if not isinstance(per_channel, bool):
    raise TypeError(f'`per_channel` must be a bool. Found {per_channel!r}.')
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f'`seed` must be an int. Found {seed!r}.')
  return QuantizationSettings(
      bits=payload_lib.validate_encoding_settings(bits, min_size_to_quantize, clipping, rounding),
      clipping=clipping,
      rounding=rounding,
      weighting=weighting,
      min_size_to_quantize=min_size_to_quantize,
      per_channel=per_channel,
      seed=seed,
      sum_result=sum_result,
  )


@dataclasses.dataclass(frozen=True)
class Codec:
  """The TF computations of one aggregation process, exposed so tests can feed them payloads.

  `encode_fn` runs at each client; `zero_fn`, `accumulate_fn`, `merge_fn` and `report_fn` form
  the `tff.federated_aggregate` that decodes and sums at the server; `finalize_fn` turns the
  accumulator (and the inner factory's float sums) into the mean and the measurements.
  """

  encode_fn: tff.Computation
  zero_fn: tff.Computation
  accumulate_fn: tff.Computation
  merge_fn: tff.Computation
  report_fn: tff.Computation
  finalize_fn: tff.Computation
  inner_process: Optional[tff.templates.AggregationProcess]
  aggregate_keys: tuple[str, ...]  # The parts of `encode_fn`'s output that `accumulate_fn` takes.


def build_codec(
    settings: QuantizationSettings,
    inner_agg_factory: tff.aggregators.UnweightedAggregationFactory,
    value_type: tff.types.Type,
    weight_type: Optional[tff.types.Type],
) -> Codec:
  """Builds the computations of the process; `weight_type` is None for the unweighted variant."""
  _check_value_type(value_type)
  plan = settings.plan_for(value_type)
  value_specs = tff.types.type_to_tf_tensor_specs(value_type)
  num_quantized = len(plan.quantized)
  weighting = settings.weighting
  float_types = [tff.TensorType(np.float32, plan.tensors[i].shape) for i in plan.float_indices]
  # A plain sum of the float tensors needs no aggregation process of its own: it is summed in
  # `accumulate_fn`, which every client's payload passes through anyway.
  sum_floats_here = bool(float_types) and type(inner_agg_factory) is tff.aggregators.SumFactory
  inner_process = None
  if float_types and not sum_floats_here:
    inner_process = inner_agg_factory.create(tff.StructWithPythonType(float_types, list))
  aggregate_keys = ('wire', 'diagnostics', 'float_weight')
  if sum_floats_here:
    aggregate_keys += ('weighted_floats',)

  client_inputs = [value_type, tff.TensorType(np.int64)]
  if weight_type is not None:
    client_inputs.append(weight_type)
  if settings.mean_aware:
    client_inputs.append(tff.TensorType(np.float32))  # The number of clients averaged.

  def encode(value, round_seed, client_weight, num_clients=None):
    tensors = [tf.cast(t, tf.float32) for t in tf.nest.flatten(value)]
    takes_part = None
    if client_weight is not None:
      # Weight 0 is how TFF's FedAvg client work marks a client whose update was non-finite (it
      # zeroes the update). Such a client, like one with a negative or non-finite weight, sends
      # only a cleared accepted flag and zeros.
      weight = tf.cast(client_weight, tf.float32)
      takes_part = tf.logical_and(tf.math.is_finite(weight), weight > 0.0)
    seed = payload_lib.client_seed(round_seed, tensors)
    quantized, floats, statistics, accepted = payload_lib.encode_tensors(
        plan, tensors, seed, takes_part, num_clients
    )
    wire = collections.OrderedDict(quantized=quantized, accepted=accepted)
    float_weight = tf.cast(accepted, tf.float32)
    if weighting == 'inverse_error':
      wire['errors'] = statistics['quantization_mse']
    elif weighting == 'inverse_normalized_error':
      wire['errors'] = statistics['normalized_mse']
    elif weighting == 'example_count':
      wire['weight'] = tf.where(accepted, weight, 0.0)
      float_weight = wire['weight']
    # What the wire does not carry already.
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

  if weight_type is None and settings.mean_aware:
    encode_fn = tff.tensorflow.computation(
        lambda value, round_seed, num_clients: encode(value, round_seed, None, num_clients),
        *client_inputs,
    )
  elif weight_type is None:
    encode_fn = tff.tensorflow.computation(
        lambda value, round_seed: encode(value, round_seed, None), *client_inputs
    )
  elif settings.mean_aware:
    encode_fn = tff.tensorflow.computation(
        lambda value, round_seed, weight, num_clients: encode(
            value, round_seed, weight, num_clients
        ),
        *client_inputs,
    )
  else:
    encode_fn = tff.tensorflow.computation(
        lambda value, round_seed, weight: encode(value, round_seed, weight), *client_inputs
    )
  encoded_type = encode_fn.type_signature.result
  wire_type = encoded_type['wire']
  client_upload_bits = _bits_of_type(wire_type) + sum(
      32 * plan.tensors[i].num_elements for i in plan.float_indices
  )
  diagnostic_bits = _bits_of_type(encoded_type['diagnostics'])

  def statistic(client, key, wire_weighting):
    """A per-tensor statistic: on the wire under `wire_weighting`, else a diagnostic."""
    if weighting == wire_weighting:
      return client['wire']['errors']
    return client['diagnostics'][key]

  def client_weights(wire, errors):
    """(weights, exact) per quantized tensor; `exact` marks zero-error tensors (weighted later).

    `errors` are what the weighting inverts (e_i, or e_i normalized); ignored otherwise.
    """
    if weighting in INVERSE_ERROR_WEIGHTINGS:
      exact = tf.equal(errors, 0.0)
      return tf.where(exact, 0.0, 1.0 / tf.where(exact, 1.0, errors)), exact
    exact = tf.zeros([num_quantized], tf.bool)
    if weighting == 'example_count':
      return tf.fill([num_quantized], wire['weight']), exact
    return tf.ones([num_quantized]), exact

  def well_formed(wire, errors, weights):
    """Scalar checks only: a well-formed payload decodes to finite, finitely weighted levels."""
    checks = [payload_lib.payload_is_well_formed(plan, wire['quantized'])]
    # Levels lie in [-s, s], so weight x s bounds every weighted level: finite thresholds near
    # the float32 maximum could still give Inf once weighted.
    checks += [
        tf.math.is_finite(weights[i] * tf.reduce_max(part['threshold']))
        for i, part in enumerate(wire['quantized'])
    ]
    checks.append(tf.reduce_all(tf.math.is_finite(errors)))
    checks.append(tf.reduce_all(errors >= 0.0))
    if weighting == 'example_count':
      checks.append(tf.logical_and(tf.math.is_finite(wire['weight']), wire['weight'] >= 0.0))
    return tf.reduce_all(tf.stack(checks))

  aggregate_input_type = tff.to_type(
      collections.OrderedDict((key, encoded_type[key]) for key in aggregate_keys)
  )

  @tff.tensorflow.computation
  def zero_fn():
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
        float_sum=[tf.zeros(t.shape) for t in float_types] if sum_floats_here else [],
    )

  accumulator_type = zero_fn.type_signature.result

  @tff.tensorflow.computation(accumulator_type, aggregate_input_type)
  def accumulate_fn(accumulator, client):
    # Invalid parts are removed with tf.where, never by multiplying with 0 (NaN * 0 is NaN).
    wire = client['wire']
    errors = statistic(client, 'quantization_mse', 'inverse_error')
    normalized_errors = statistic(client, 'normalized_mse', 'inverse_normalized_error')
    accepted = wire['accepted']
    weights, exact = client_weights(
        wire, normalized_errors if weighting == 'inverse_normalized_error' else errors
    )
    checked_errors = tf.concat([errors, normalized_errors], axis=0)
    valid = tf.logical_and(accepted, well_formed(wire, checked_errors, weights))
    malformed = tf.logical_and(accepted, tf.logical_not(valid))
    weights = tf.where(valid, weights, 0.0)
    exact = tf.logical_and(valid, exact)
    # An invalid payload's levels are formed with zero thresholds, i.e. are zeros.
    parts = [
        collections.OrderedDict(
            codes=part['codes'],
            threshold=tf.where(valid, part['threshold'], tf.zeros_like(part['threshold'])),
        )
        for part in wire['quantized']
    ]
    thresholds = [tf.reduce_mean(part['threshold']) for part in wire['quantized']]

    def add_if_valid(key, values):
      return accumulator[key] + tf.where(valid, values, tf.zeros_like(values))

    float_weight = client['float_weight']
    float_weight = tf.where(
        tf.logical_and(tf.math.is_finite(float_weight), float_weight >= 0.0), float_weight, 0.0
    )
    return collections.OrderedDict(
        weighted_sum=[
            total + payload_lib.weighted_levels(encoding, part, weights[i])
            for i, (total, encoding, part) in enumerate(
                zip(accumulator['weighted_sum'], plan.quantized, parts)
            )
        ],
        weight_sum=accumulator['weight_sum'] + weights,
        # A zero-error tensor is rare: tf.cond skips the full-size work for all others.
        exact_sum=[
            tf.cond(
                exact[i],
                lambda total=total, encoding=encoding, part=part: total
                + payload_lib.weighted_levels(encoding, part, 1.0),
                lambda total=total: total,
            )
            for i, (total, encoding, part) in enumerate(
                zip(accumulator['exact_sum'], plan.quantized, parts)
            )
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
        # As the inner SumFactory would: every payload's float tensors, already weighted.
        float_sum=[
            total + value
            for total, value in zip(accumulator['float_sum'], client.get('weighted_floats', []))
        ],
    )

  @tff.tensorflow.computation(accumulator_type, accumulator_type)
  def merge_fn(a, b):
    merged = collections.OrderedDict(
        (key, tf.nest.map_structure(tf.add, a[key], b[key])) for key in a
    )
    merged['weight_min'] = tf.minimum(a['weight_min'], b['weight_min'])
    merged['weight_max'] = tf.maximum(a['weight_max'], b['weight_max'])
    return merged

  @tff.tensorflow.computation(accumulator_type)
  def report_fn(accumulator):
    return accumulator

  quantized_sizes = np.array([t.num_elements for t in plan.quantized], np.float32)

  float_sum_type = inner_process.next.type_signature.result.result.member if inner_process else None

  @tff.tensorflow.computation(accumulator_type, float_sum_type or tff.to_type(()))
  def finalize_fn(accumulator, float_sums):
    if sum_floats_here:
      float_sums = accumulator['float_sum']
    # A zero-error client (its tensor was exactly representable, e.g. all zeros) counts with the
    # weight of the round's most accurate other client: finite, and never dominating.
    exact_weight = tf.where(accumulator['weight_max'] > 0.0, accumulator['weight_max'], 1.0)
    # The sum form divides by nothing (its weights are 1 or 0, and nothing is exact).
    divide = (lambda total, _: total) if settings.sum_result else tf.math.divide_no_nan
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

    accepted = tf.cast(accumulator['accepted'], tf.float32)
    participants = accumulator['accepted'] + accumulator['rejected_nonfinite'] + accumulator['rejected_malformed']
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
            bits=tf.constant([t.bits for t in plan.quantized] or np.zeros([0]), tf.int32),
            clipping_threshold=per_tensor_mean('clipping_threshold'),
            quantization_mse=per_tensor_mean('quantization_mse'),
            normalized_mse=per_tensor_mean('normalized_mse'),
            clipped_fraction=per_tensor_mean('clipped_fraction'),
            weight_max_over_min=spread,
        ),
    )
    return result, measurements

  return Codec(
      encode_fn, zero_fn, accumulate_fn, merge_fn, report_fn, finalize_fn, inner_process,
      aggregate_keys,
  )


def _build_process(
    settings: QuantizationSettings,
    inner_agg_factory: tff.aggregators.UnweightedAggregationFactory,
    value_type: tff.types.Type,
    weight_type: Optional[tff.types.Type],
) -> tff.templates.AggregationProcess:
  """Builds the aggregation process; `weight_type` is None for the unweighted variant."""
  codec = build_codec(settings, inner_agg_factory, value_type, weight_type)
  inner_process = codec.inner_process
  # Float tensors summed inside the aggregate keep the state and measurements (both empty) that
  # the inner SumFactory would have.
  floats_summed_here = 'weighted_floats' in codec.aggregate_keys

  @tff.tensorflow.computation
  def initial_seed():
    return tf.constant(settings.seed, tf.int64)

  @tff.tensorflow.computation
  def initial_num_clients():
    return tf.constant(1.0, tf.float32)

  @tff.federated_computation
  def init_fn():
    state = collections.OrderedDict(round_seed=tff.federated_eval(initial_seed, tff.SERVER))
    if settings.mean_aware:
      state['num_clients'] = tff.federated_eval(initial_num_clients, tff.SERVER)
    if inner_process is not None:
      state['float_tensors'] = inner_process.initialize()
    elif floats_summed_here:
      state['float_tensors'] = tff.federated_value((), tff.SERVER)
    return tff.federated_zip(state)

  @tff.tensorflow.computation(np.int64)
  def next_seed(seed):
    return seed + 1

  @tff.tensorflow.computation(np.float32, np.float32)
  def next_num_clients(num_clients, effective_clients):
    # A round in which no client was accepted teaches nothing: keep the last value.
    return tf.where(effective_clients >= 1.0, effective_clients, num_clients)

  state_type = init_fn.type_signature.result

  def next_body(state, value, weight):
    round_seed = tff.federated_broadcast(state['round_seed'])
    encode_args = (value, round_seed) if weight is None else (value, round_seed, weight)
    if settings.mean_aware:
      encode_args += (tff.federated_broadcast(state['num_clients']),)
    encoded = tff.federated_map(codec.encode_fn, encode_args)
    if len(codec.aggregate_keys) == len(codec.encode_fn.type_signature.result):
      # Everything the clients encode is aggregated: no per-client selection and zip, which
      # cost TFF's runtime about 0.1 ms per client.
      to_aggregate = encoded
    else:
      to_aggregate = tff.federated_zip(
          collections.OrderedDict((key, encoded[key]) for key in codec.aggregate_keys)
      )
    accumulated = tff.federated_aggregate(
        to_aggregate, codec.zero_fn(), codec.accumulate_fn, codec.merge_fn, codec.report_fn
    )
    new_state = collections.OrderedDict(round_seed=tff.federated_map(next_seed, state['round_seed']))
    if inner_process is not None:
      inner_output = inner_process.next(state['float_tensors'], encoded['weighted_floats'])
      new_state['float_tensors'] = inner_output.state
      float_sums, float_measurements = inner_output.result, inner_output.measurements
    else:
      if floats_summed_here:
        new_state['float_tensors'] = state['float_tensors']
      float_sums = float_measurements = tff.federated_value((), tff.SERVER)
    result, measurements = tff.federated_map(codec.finalize_fn, (accumulated, float_sums))
    if settings.mean_aware:
      new_state['num_clients'] = tff.federated_map(
          next_num_clients, (state['num_clients'], measurements.effective_clients)
      )
      new_state.move_to_end('num_clients', last=False)
      new_state.move_to_end('round_seed', last=False)  # The order of `init_fn`'s state.
    measurements = tff.federated_zip(
        collections.OrderedDict(quantized=measurements, float_tensors=float_measurements)
    )
    return tff.templates.MeasuredProcessOutput(
        state=tff.federated_zip(new_state), result=result, measurements=measurements
    )

  value_at_clients = tff.FederatedType(value_type, tff.CLIENTS)
  if weight_type is None:

    @tff.federated_computation(state_type, value_at_clients)
    def next_fn(state, value):
      return next_body(state, value, None)

  else:

    @tff.federated_computation(state_type, value_at_clients, tff.FederatedType(weight_type, tff.CLIENTS))
    def next_fn(state, value, weight):
      return next_body(state, value, weight)

  return tff.templates.AggregationProcess(init_fn, next_fn)


class ClippedQuantizationMeanFactory(tff.aggregators.WeightedAggregationFactory):
  """Weighted mean over clipped, B-bit quantized client values (see the module docstring).

  With any weighting but 'example_count' the client weights handed to `next` only decide,
  at the client, whether it takes part (weight > 0); they never leave the clients. Only
  'example_count' sends them.
  """

  def __init__(
      self,
      bits: Union[payload_lib.BitsSpec, str] = 4,
      clipping: Union[str, float] = 'max_abs',
      rounding: str = 'stochastic',
      weighting: str = 'example_count',
      min_size_to_quantize: int = 128,
      per_channel: bool = False,
      seed: int = 0,
      inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  ):
    """Initializes the factory.

    Args:
      bits: bits per coordinate, 1..16: one width, or one per quantized tensor / per tensor in
        value order (a sequence or a string like '4-2-2-4').
      clipping: 'max_abs' (no clipping; the default, measured best), 'octav' (MSE-optimal
        for this quantizer and rounding, the paper's), 'octav_paper' (the paper's noise model),
        'mean_optimal' (MSE-optimal for the mean of the clients averaged), or a fixed positive
        threshold.
      rounding: 'stochastic' (unbiased; the default) or 'nearest'.
      weighting: 'example_count' (alias 'fedavg'; the default), 'inverse_error' (the paper's),
        'inverse_normalized_error' or 'uniform'.
      min_size_to_quantize: tensors with fewer elements are sent in float32.
      per_channel: one threshold per slice of each tensor's last axis.
      seed: first round's seed for stochastic rounding (advanced every round).
      inner_agg_factory: sums the weighted float32 tensors; default `tff.aggregators.SumFactory`.
    """
    self._settings = _validate_settings(
        bits, clipping, rounding, weighting, WEIGHTINGS, min_size_to_quantize, per_channel,
        seed,
    )
    self._inner_agg_factory = _check_inner(inner_agg_factory)

  @property
  def settings(self) -> QuantizationSettings:
    return self._settings

  def create(
      self, value_type: tff.types.Type, weight_type: tff.types.Type
  ) -> tff.templates.AggregationProcess:
    if not isinstance(weight_type, tff.types.TensorType) or weight_type.shape != ():
      raise TypeError(f'Expected a scalar `weight_type`. Found {weight_type}.')
    return _build_process(self._settings, self._inner_agg_factory, value_type, weight_type)


class UnweightedClippedQuantizationMeanFactory(tff.aggregators.UnweightedAggregationFactory):
  """Unweighted counterpart of `ClippedQuantizationMeanFactory` (no 'example_count')."""

  def __init__(
      self,
      bits: Union[payload_lib.BitsSpec, str] = 4,
      clipping: Union[str, float] = 'max_abs',
      rounding: str = 'stochastic',
      weighting: str = 'uniform',
      min_size_to_quantize: int = 128,
      per_channel: bool = False,
      seed: int = 0,
      inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  ):
    """Same arguments as `ClippedQuantizationMeanFactory`, without 'example_count' (default
    weighting 'uniform')."""
    self._settings = _validate_settings(
        bits, clipping, rounding, weighting, UNWEIGHTED_WEIGHTINGS, min_size_to_quantize,
        per_channel, seed,
    )
    self._inner_agg_factory = _check_inner(inner_agg_factory)

  @property
  def settings(self) -> QuantizationSettings:
    return self._settings

  def create(self, value_type: tff.types.Type) -> tff.templates.AggregationProcess:
    return _build_process(self._settings, self._inner_agg_factory, value_type, None)


def _check_inner(
    inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory],
) -> tff.aggregators.UnweightedAggregationFactory:
  if inner_agg_factory is None:
    return tff.aggregators.SumFactory()
  if not isinstance(inner_agg_factory, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(
        '`inner_agg_factory` must be a tff.aggregators.UnweightedAggregationFactory. '
        f'Found {type(inner_agg_factory).__name__}.'
    )
  return inner_agg_factory


class ClippedQuantizationSumFactory(tff.aggregators.UnweightedAggregationFactory):
  """Sum of clipped, B-bit quantized client values: the inner factory of TFF's wrappers.

  The same encoding as `ClippedQuantizationMeanFactory` with uniform weights, returning the sum
  instead of the mean, so it composes where TFF expects a sum: as `value_sum_factory` of
  `tff.aggregators.MeanFactory` (which weights at the clients and divides at the server), or as
  `inner_agg_factory` of `tff.aggregators.HadamardTransformFactory` (random rotation first).
  """

  def __init__(
      self,
      bits: Union[payload_lib.BitsSpec, str] = 4,
      clipping: Union[str, float] = 'max_abs',
      rounding: str = 'stochastic',
      min_size_to_quantize: int = 128,
      per_channel: bool = False,
      seed: int = 0,
      inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  ):
    """Arguments as in `ClippedQuantizationMeanFactory`, without `weighting`."""
    self._settings = _validate_settings(
        bits, clipping, rounding, 'uniform', ('uniform',), min_size_to_quantize, per_channel,
        seed, sum_result=True,
    )
    self._inner_agg_factory = _check_inner(inner_agg_factory)

  @property
  def settings(self) -> QuantizationSettings:
    return self._settings

  def create(self, value_type: tff.types.Type) -> tff.templates.AggregationProcess:
    return _build_process(self._settings, self._inner_agg_factory, value_type, None)


def clipped_quantization_sum(
    bits: Union[payload_lib.BitsSpec, str] = 4,
    clipping: Union[str, float] = 'max_abs',
    rounding: str = 'stochastic',
    **kwargs,
) -> ClippedQuantizationSumFactory:
  """The sum form, e.g. `tff.aggregators.HadamardTransformFactory(clipped_quantization_sum(2))`.

  Further keyword arguments (min_size_to_quantize, per_channel, seed, inner_agg_factory) are
  those of `ClippedQuantizationSumFactory`.
  """
  return ClippedQuantizationSumFactory(bits, clipping, rounding, **kwargs)


def clipped_quantization_mean(
    bits: Union[payload_lib.BitsSpec, str] = 4,
    clipping: Union[str, float] = 'max_abs',
    rounding: str = 'stochastic',
    weighting: str = 'example_count',
    **kwargs,
) -> ClippedQuantizationMeanFactory:
  """The weighted factory, for `tff.learning.algorithms.build_weighted_fed_avg(model_aggregator=...)`.

  Further keyword arguments (min_size_to_quantize, per_channel, seed,
  inner_agg_factory) are those of `ClippedQuantizationMeanFactory`.
  """
  return ClippedQuantizationMeanFactory(bits, clipping, rounding, weighting, **kwargs)


def unweighted_clipped_quantization_mean(
    bits: Union[payload_lib.BitsSpec, str] = 4,
    clipping: Union[str, float] = 'max_abs',
    rounding: str = 'stochastic',
    weighting: str = 'uniform',
    **kwargs,
) -> UnweightedClippedQuantizationMeanFactory:
  """The unweighted factory, for `tff.learning.algorithms.build_unweighted_fed_avg`."""
  return UnweightedClippedQuantizationMeanFactory(bits, clipping, rounding, weighting, **kwargs)
