"""Validated settings of the clipped-quantization factories and the checks on their value types."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from absl import logging
import numpy as np
import tensorflow_federated as tff

from tff_clipq.quantization import encoding_plan

WEIGHTINGS = ('inverse_error', 'inverse_normalized_error', 'example_count', 'uniform')
UNWEIGHTED_WEIGHTINGS = ('inverse_error', 'inverse_normalized_error', 'uniform')
# Other names users type for a weighting.
WEIGHTING_ALIASES = {'fedavg': 'example_count'}
# Weightings whose clients send a per-tensor error (1 / error is the weight).
INVERSE_ERROR_WEIGHTINGS = ('inverse_error', 'inverse_normalized_error')


@dataclasses.dataclass(frozen=True)
class QuantizationSettings:
  """Validated settings shared by the weighted, unweighted and sum factories."""

  bits: encoding_plan.BitsSpec
  clipping: Union[str, float]
  rounding: str
  weighting: str
  min_size_to_quantize: int
  per_channel: bool
  seed: int
  sum_result: bool = False  # The sum form: weighted sum, not divided by the weights' sum.
  sample_fraction: float = 1.0  # Fraction of each quantized tensor's entries sent.

  @property
  def mean_aware(self) -> bool:
    """Whether clients need the number of clients averaged (the process learns it)."""
    return self.clipping == 'mean_optimal'

  def plan_for(self, value_type: tff.types.Type) -> encoding_plan.EncodingPlan:
    """The encoding plan for `value_type`; logs which width went to which tensor.

    A list of widths is matched to the tensors one per quantized tensor or one per tensor, so
    the log line says how it was read.
    """
    shapes = [tuple(t.shape) for t in flat_tensor_types(value_type)]
    plan = encoding_plan.make_plan(
      shapes,
      self.bits,
      self.min_size_to_quantize,
      self.clipping,
      self.rounding,
      self.per_channel,
      self.sample_fraction,
    )
    if plan.budget is not None:
      logging.info(
        'clipq bit budget: %s, %d code bits per client in %d words',
        plan.budget,
        plan.budget_bits,
        plan.budget_words,
      )
    elif isinstance(self.bits, tuple):
      logging.info(
        'clipq bits per tensor: %s',
        ', '.join(
          f'{list(t.shape)}: {t.bits if t.bits is not None else "float32"}' for t in plan.tensors
        ),
      )
    return plan


def flat_tensor_types(value_type: tff.types.Type) -> list[tff.types.TensorType]:
  if isinstance(value_type, tff.types.TensorType):
    return [value_type]
  return list(tff.structure.flatten(value_type))


def check_value_type(value_type: tff.types.Type) -> None:
  """Raises TypeError unless `value_type` holds only fully defined float32 tensors."""
  if not isinstance(value_type, (tff.types.TensorType, tff.types.StructType)):
    raise TypeError(
      f'Expected `value_type` to be a tff.TensorType or tff.StructType. Found {value_type}.'
    )
  for tensor_type in flat_tensor_types(value_type):
    if not isinstance(tensor_type, tff.types.TensorType) or tensor_type.dtype != np.float32:
      raise TypeError(
        f'Expected `value_type` to hold only float32 tensors. Found {tensor_type} in {value_type}.'
      )
    if not tff.types.is_shape_fully_defined(tensor_type.shape):
      raise TypeError(f'Expected fully defined tensor shapes. Found {tensor_type} in {value_type}.')


def bits_of_type(type_spec: tff.types.Type) -> int:
  """Bits needed to transmit a value of `type_spec` (bool counts 8 bits, as TF stores it)."""
  total = 0
  for tensor_type in flat_tensor_types(type_spec):
    elements = tff.types.num_elements_in_shape(tensor_type.shape)
    total += elements * np.dtype(tensor_type.dtype).itemsize * 8
  return total


def validate_settings(
  bits: Union[encoding_plan.BitsSpec, str],
  clipping: Union[str, float],
  rounding: str,
  weighting: str,
  allowed_weightings: tuple[str, ...],
  min_size_to_quantize: int,
  per_channel: bool,
  seed: int,
  sum_result: bool = False,
  sample_fraction: float = 1.0,
) -> QuantizationSettings:
  """The factories' settings, checked; raises ValueError/TypeError naming the argument.

  Args:
    bits: one width 1..16, or one per quantized tensor / per tensor, or a budget such as
      'budget:2.15' (average code bits per quantized coordinate; widths chosen by each client).
    clipping: a method of `tff_clipq.quantization.CLIPPING_METHODS` or a positive threshold.
    rounding: 'nearest' or 'stochastic'.
    weighting: one of `allowed_weightings`, or an alias in `WEIGHTING_ALIASES`.
    allowed_weightings: the weightings this factory supports.
    min_size_to_quantize: smaller tensors travel in float32.
    per_channel: one threshold per slice of the last axis.
    seed: the first round's seed for stochastic rounding.
    sum_result: the sum form (no division by the weights' sum).
    sample_fraction: in (0, 1]; below 1 each quantized tensor sends a uniformly chosen
      max(1, ceil(f n)) of its n entries (not with `per_channel`).
  """
  weighting = WEIGHTING_ALIASES.get(weighting, weighting)
  if weighting not in allowed_weightings:
    raise ValueError(f'`weighting` must be one of {allowed_weightings}. Found {weighting!r}.')
  if not isinstance(per_channel, bool):
    raise TypeError(f'`per_channel` must be a bool. Found {per_channel!r}.')
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f'`seed` must be an int. Found {seed!r}.')
  sample_fraction = encoding_plan.validate_sample_fraction(sample_fraction, per_channel)
  bits = encoding_plan.validate_encoding_settings(bits, min_size_to_quantize, clipping, rounding)
  encoding_plan.validate_budget(bits, per_channel, sample_fraction)
  return QuantizationSettings(
    bits=bits,
    clipping=clipping,
    rounding=rounding,
    weighting=weighting,
    min_size_to_quantize=min_size_to_quantize,
    per_channel=per_channel,
    seed=seed,
    sum_result=sum_result,
    sample_fraction=sample_fraction,
  )


def check_inner(
  inner_agg_factory: Optional[tff.aggregators.UnweightedAggregationFactory],
) -> tff.aggregators.UnweightedAggregationFactory:
  """`inner_agg_factory`, or `tff.aggregators.SumFactory()` for None; raises TypeError otherwise."""
  if inner_agg_factory is None:
    return tff.aggregators.SumFactory()
  if not isinstance(inner_agg_factory, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(
      '`inner_agg_factory` must be a tff.aggregators.UnweightedAggregationFactory. '
      f'Found {type(inner_agg_factory).__name__}.'
    )
  return inner_agg_factory
