"""The clipq aggregation processes and their factories (TFF's `tff.aggregators` interface).

`build_codec` wraps the client's encode (`client.py`) and the server's accumulate, merge and
finalize (`server.py`, `measurements.py`) as TFF computations; `_build_process` wires them into
an `AggregationProcess` whose `next` reads as client (broadcast seed, encode), inner aggregation
(`tff.federated_aggregate`, and the inner factory for float tensors) and server (finalize, next
state). The module docstring of the package says what the process computes.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.aggregators.clipped_quantization import client
from tff_clipq.aggregators.clipped_quantization import measurements as measurements_lib
from tff_clipq.aggregators.clipped_quantization import server
from tff_clipq.aggregators.clipped_quantization import settings as settings_lib
from tff_clipq.quantization import encoding_plan


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
  settings: settings_lib.QuantizationSettings,
  inner_agg_factory: tff.aggregators.UnweightedAggregationFactory,
  value_type: tff.types.Type,
  weight_type: Optional[tff.types.Type],
) -> Codec:
  """Builds the computations of the process; `weight_type` is None for the unweighted variant.

  Args:
    settings: the factory's validated settings.
    inner_agg_factory: sums the weighted float tensors (a plain `SumFactory` is folded into the
      aggregate instead).
    value_type: the clients' value type (float32 tensors of fully defined shapes).
    weight_type: the clients' weight type, or None.
  """
  settings_lib.check_value_type(value_type)
  plan = settings.plan_for(value_type)
  value_specs = tff.types.type_to_tf_tensor_specs(value_type)
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
  encode = lambda *args: client.encode(plan, weighting, *args)
  if weight_type is None and settings.mean_aware:
    encode_fn = tff.tensorflow.computation(
      lambda value, round_seed, num_clients: encode(value, round_seed, None, num_clients),
      *client_inputs,
    )
  elif weight_type is None:
    encode_fn = tff.tensorflow.computation(
      lambda value, round_seed: encode(value, round_seed), *client_inputs
    )
  elif settings.mean_aware:
    encode_fn = tff.tensorflow.computation(
      lambda value, round_seed, weight, num_clients: encode(value, round_seed, weight, num_clients),
      *client_inputs,
    )
  else:
    encode_fn = tff.tensorflow.computation(
      lambda value, round_seed, weight: encode(value, round_seed, weight), *client_inputs
    )
  encoded_type = encode_fn.type_signature.result
  client_upload_bits = settings_lib.bits_of_type(encoded_type['wire']) + sum(
    32 * plan.tensors[i].num_elements for i in plan.float_indices
  )
  diagnostic_bits = settings_lib.bits_of_type(encoded_type['diagnostics'])
  aggregate_input_type = tff.to_type(
    collections.OrderedDict((key, encoded_type[key]) for key in aggregate_keys)
  )

  zero_fn = tff.tensorflow.computation(
    lambda: server.zero_accumulator(plan, float_types, sum_floats_here)
  )
  accumulator_type = zero_fn.type_signature.result
  accumulate_fn = tff.tensorflow.computation(
    lambda accumulator, value: server.accumulate(plan, weighting, accumulator, value),
    accumulator_type,
    aggregate_input_type,
  )
  merge_fn = tff.tensorflow.computation(server.merge, accumulator_type, accumulator_type)
  report_fn = tff.tensorflow.computation(lambda accumulator: accumulator, accumulator_type)
  float_sum_type = inner_process.next.type_signature.result.result.member if inner_process else None

  @tff.tensorflow.computation(accumulator_type, float_sum_type or tff.to_type(()))
  def finalize_fn(accumulator, float_sums):
    return measurements_lib.finalize(
      plan,
      settings.sum_result,
      value_specs,
      client_upload_bits,
      diagnostic_bits,
      accumulator,
      accumulator['float_sum'] if sum_floats_here else float_sums,
    )

  return Codec(
    encode_fn,
    zero_fn,
    accumulate_fn,
    merge_fn,
    report_fn,
    finalize_fn,
    inner_process,
    aggregate_keys,
  )


def _build_process(
  settings: settings_lib.QuantizationSettings,
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
    new_state = collections.OrderedDict(
      round_seed=tff.federated_map(next_seed, state['round_seed'])
    )
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

    @tff.federated_computation(
      state_type, value_at_clients, tff.FederatedType(weight_type, tff.CLIENTS)
    )
    def next_fn(state, value, weight):
      return next_body(state, value, weight)

  return tff.templates.AggregationProcess(init_fn, next_fn)


class _Factory:
  """What the three factories share: validated settings and the inner factory."""

  def __init__(
    self,
    settings: settings_lib.QuantizationSettings,
    inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory],
  ):
    self._settings = settings
    self._inner_agg_factory = settings_lib.check_inner(inner_agg_factory)

  @property
  def settings(self) -> settings_lib.QuantizationSettings:
    """The validated settings (bits per tensor are resolved when a value type is known)."""
    return self._settings


class _WeightedFactory(_Factory, tff.aggregators.WeightedAggregationFactory):
  """The weighted mean (`clipped_quantization_mean`)."""

  def create(
    self, value_type: tff.types.Type, weight_type: tff.types.Type
  ) -> tff.templates.AggregationProcess:
    """Builds the aggregation process.

    Args:
      value_type: the clients' value type (float32 tensors of fully defined shapes).
      weight_type: the clients' weight type (a float32 scalar).
    """
    if not isinstance(weight_type, tff.types.TensorType) or weight_type.shape != ():
      raise TypeError(f'Expected a scalar `weight_type`. Found {weight_type}.')
    return _build_process(self._settings, self._inner_agg_factory, value_type, weight_type)


class _UnweightedFactory(_Factory, tff.aggregators.UnweightedAggregationFactory):
  """The unweighted mean and the sum (`unweighted_clipped_quantization_mean`, `..._sum`)."""

  def create(self, value_type: tff.types.Type) -> tff.templates.AggregationProcess:
    return _build_process(self._settings, self._inner_agg_factory, value_type, None)


def clipped_quantization_mean(
  bits: Union[encoding_plan.BitsSpec, str] = 4,
  clipping: Union[str, float] = 'max_abs',
  rounding: str = 'stochastic',
  weighting: str = 'example_count',
  min_size_to_quantize: int = 128,
  per_channel: bool = False,
  seed: int = 0,
  inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  sample_fraction: float = 1.0,
) -> tff.aggregators.WeightedAggregationFactory:
  """Weighted mean of clipped, B-bit quantized client values (see the package docstring).

  For `tff.learning.algorithms.build_weighted_fed_avg(model_aggregator=...)`. With any weighting
  but 'example_count' the client weights handed to `next` only decide, at the client, whether
  it takes part (weight > 0); they never leave the clients. Only 'example_count' sends them.

  Args:
    bits: bits per coordinate, 1..16: one width, or one per quantized tensor / per tensor in
      value order (a sequence or a string like '4-2-2-4').
    clipping: 'max_abs' (no clipping; the default, measured best), 'octav' (MSE-optimal for
      this quantizer and rounding, the paper's), 'octav_paper' (the paper's noise model),
      'mean_optimal' (MSE-optimal for the mean of the clients averaged), or a fixed positive
      threshold.
    rounding: 'stochastic' (unbiased; the default) or 'nearest'.
    weighting: 'example_count' (alias 'fedavg'; the default), 'inverse_error' (the paper's),
      'inverse_normalized_error' or 'uniform'.
    min_size_to_quantize: tensors with fewer elements are sent in float32.
    per_channel: one threshold per slice of each tensor's last axis.
    seed: first round's seed for stochastic rounding (advanced every round).
    inner_agg_factory: sums the weighted float32 tensors; default `tff.aggregators.SumFactory`.
    sample_fraction: f in (0, 1]: each quantized tensor of n entries sends the codes of a
      uniformly chosen k = max(1, ceil(f n)) of them, which the server scatters back scaled by
      n / k (unbiased; below 1 bit per coordinate at 1 bit). The client sends one int32 seed
      from which the server derives the coordinates. With the inverse-error weightings e_i is
      the quantization error of the entries sent. Not with `per_channel`. 1: every entry.
  """
  settings = settings_lib.validate_settings(
    bits,
    clipping,
    rounding,
    weighting,
    settings_lib.WEIGHTINGS,
    min_size_to_quantize,
    per_channel,
    seed,
    sample_fraction=sample_fraction,
  )
  return _WeightedFactory(settings, inner_agg_factory)


def unweighted_clipped_quantization_mean(
  bits: Union[encoding_plan.BitsSpec, str] = 4,
  clipping: Union[str, float] = 'max_abs',
  rounding: str = 'stochastic',
  weighting: str = 'uniform',
  min_size_to_quantize: int = 128,
  per_channel: bool = False,
  seed: int = 0,
  inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  sample_fraction: float = 1.0,
) -> tff.aggregators.UnweightedAggregationFactory:
  """Unweighted mean, for `tff.learning.algorithms.build_unweighted_fed_avg`.

  Args:
    bits, clipping, rounding, min_size_to_quantize, per_channel, seed, inner_agg_factory,
      sample_fraction: as for `clipped_quantization_mean`.
    weighting: 'uniform' (the default), 'inverse_error' or 'inverse_normalized_error'.
  """
  settings = settings_lib.validate_settings(
    bits,
    clipping,
    rounding,
    weighting,
    settings_lib.UNWEIGHTED_WEIGHTINGS,
    min_size_to_quantize,
    per_channel,
    seed,
    sample_fraction=sample_fraction,
  )
  return _UnweightedFactory(settings, inner_agg_factory)


def clipped_quantization_sum(
  bits: Union[encoding_plan.BitsSpec, str] = 4,
  clipping: Union[str, float] = 'max_abs',
  rounding: str = 'stochastic',
  min_size_to_quantize: int = 128,
  per_channel: bool = False,
  seed: int = 0,
  inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None,
  sample_fraction: float = 1.0,
) -> tff.aggregators.UnweightedAggregationFactory:
  """Sum of clipped, B-bit quantized client values: the inner factory of TFF's wrappers.

  The encoding of the mean with uniform weights, returning the sum, so it composes where TFF
  expects a sum: `tff.aggregators.HadamardTransformFactory(clipped_quantization_sum(2))`
  (random rotation first), or `value_sum_factory` of `tff.aggregators.MeanFactory`.

  Args:
    bits, clipping, rounding, min_size_to_quantize, per_channel, seed, inner_agg_factory,
      sample_fraction: as for `clipped_quantization_mean` (the sum has no weighting).
  """
  settings = settings_lib.validate_settings(
    bits,
    clipping,
    rounding,
    'uniform',
    ('uniform',),
    min_size_to_quantize,
    per_channel,
    seed,
    sum_result=True,
    sample_fraction=sample_fraction,
  )
  return _UnweightedFactory(settings, inner_agg_factory)
