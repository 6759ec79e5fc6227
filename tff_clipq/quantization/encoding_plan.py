"""The encoding plan of a client value: which tensors are quantized, with how many bits.

An `EncodingPlan` fixes, for every tensor of a value (e.g. a model's trainable weights), whether
it is quantized and with how many bits, how its threshold is chosen, and, with a
`sample_fraction` below 1, how many of its entries are sent. With a bit budget
(`bits='budget:1.5'`) the widths are chosen by each client (`budget_payload.py`) and the plan
fixes only the total. `make_plan` builds it from the tensors' shapes and validated settings;
`payload.py` (fixed widths) and `budget_payload.py` (a budget) encode and decode values by it.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np

from tff_clipq.quantization import bit_allocation
from tff_clipq.quantization import packing
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import thresholds

BitsSpec = Union[int, Sequence[int], bit_allocation.BitBudget]


@dataclasses.dataclass(frozen=True)
class TensorEncoding:
  """How one tensor travels: `bits=None` means float32, unquantized.

  In a plan with a budget, a quantized tensor's `bits` is the widest width it may get
  (`bit_allocation.MAX_WIDTH`); each client chooses the width it uses.

  `sent` is the number of its entries whose codes are sent (a uniformly chosen subset, see
  `selected_coordinates`); None means all of them.
  """

  shape: tuple[int, ...]
  bits: Optional[int]
  sent: Optional[int] = None

  @property
  def num_elements(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def sampled(self) -> bool:
    return self.sent is not None

  @property
  def num_sent(self) -> int:
    """Entries whose codes are sent (all of them unless `sampled`)."""
    return self.num_elements if self.sent is None else self.sent

  @property
  def packed_words(self) -> int:
    return packing.packed_length(self.num_sent, self.bits)


@dataclasses.dataclass(frozen=True)
class EncodingPlan:
  """Per-tensor encodings plus the clipping/rounding settings shared by all quantized tensors."""

  tensors: tuple[TensorEncoding, ...]
  clipping: Union[str, float]
  rounding: str
  per_channel: bool
  budget: Optional[bit_allocation.BitBudget] = None

  @property
  def budget_bits(self) -> int:
    """The code bits a client spends on the quantized tensors (plans with a `budget`)."""
    return self.budget.total_bits(sum(t.num_elements for t in self.quantized))

  @property
  def budget_words(self) -> int:
    """The int32 words of the buffer that holds them."""
    return -(-self.budget_bits // packing.WORD_BITS)

  @property
  def quantized(self) -> tuple[TensorEncoding, ...]:
    return tuple(t for t in self.tensors if t.bits is not None)

  @property
  def quantized_indices(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.tensors) if t.bits is not None)

  @property
  def float_indices(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.tensors) if t.bits is None)

  def in_order(self, quantized: Sequence[Any], floats: Sequence[Any]) -> list[Any]:
    """The quantized tensors' and the float tensors' items merged into the value's order.

    Args:
      quantized: one item per quantized tensor, in order (e.g. decoded tensors).
      floats: one item per float32 tensor, in order.
    """
    quantized, floats = iter(quantized), iter(floats)
    return [next(quantized) if t.bits is not None else next(floats) for t in self.tensors]

  @property
  def num_coordinates(self) -> int:
    return sum(t.num_elements for t in self.tensors)

  @property
  def sampled(self) -> bool:
    """Whether any tensor sends a subset of its entries (the payload then carries a seed)."""
    return any(t.sampled for t in self.tensors)


def parse_bits(bits: Union[BitsSpec, str]) -> BitsSpec:
  """Accepts an int, a sequence of ints, a dash-separated string like the paper's '4-2-2-4', or
  a budget like 'budget:1.5' (average code bits per quantized coordinate)."""
  if isinstance(bits, bit_allocation.BitBudget):
    return bit_allocation.parse_budget(str(bits))
  if bit_allocation.is_budget(bits):
    return bit_allocation.parse_budget(bits)
  if isinstance(bits, str):
    try:
      parts = [int(part) for part in bits.split('-')]
    except ValueError:
      raise ValueError(
        f'`bits` must be an integer, a dash-separated list like 4-2-2-4 or a budget like '
        f'budget:2.15. Found {bits!r}.'
      ) from None
    bits = parts[0] if len(parts) == 1 else tuple(parts)
  if isinstance(bits, (list, tuple)):
    return tuple(quantizer.validate_bits(b) for b in bits)
  return quantizer.validate_bits(bits)


def validate_clipping(clipping: Union[str, float]) -> Union[str, float]:
  """Returns `clipping` if it is a known method or a positive finite threshold, else raises."""
  if isinstance(clipping, str):
    if clipping not in thresholds.CLIPPING_METHODS:
      raise ValueError(
        f'`clipping` must be one of {thresholds.CLIPPING_METHODS} or a positive number. '
        f'Found {clipping!r}.'
      )
  elif (
    isinstance(clipping, bool)
    or not isinstance(clipping, (int, float))
    or not 0 < clipping < float('inf')
  ):
    raise ValueError(
      f'A fixed `clipping` threshold must be a positive finite number. Found {clipping!r}.'
    )
  return clipping


def validate_encoding_settings(
  bits: Union[BitsSpec, str], min_size_to_quantize: int, clipping: Union[str, float], rounding: str
) -> BitsSpec:
  """Validates the settings shared by every tensor; returns `bits` parsed (int or tuple).

  Args:
    bits: an int, a sequence of ints, or a dash-separated string like '4-2-2-4'; each in 1..16;
      or a budget like 'budget:2.15'.
    min_size_to_quantize: non-negative int; tensors with fewer elements travel in float32.
    clipping: one of `thresholds.CLIPPING_METHODS`, or a fixed positive, finite threshold.
    rounding: 'nearest' or 'stochastic'.

  Raises:
    ValueError: if any setting is invalid.
  """
  bits = parse_bits(bits)
  quantizer.validate_rounding(rounding)
  validate_clipping(clipping)
  if (
    isinstance(min_size_to_quantize, bool)
    or not isinstance(min_size_to_quantize, int)
    or min_size_to_quantize < 0
  ):
    raise ValueError(
      f'`min_size_to_quantize` must be a non-negative integer. Found {min_size_to_quantize!r}.'
    )
  return bits


def validate_budget(bits: BitsSpec, per_channel: bool, sample_fraction: float) -> None:
  """Raises ValueError when a bit budget is combined with what it does not support.

  Args:
    bits: parsed bits (`parse_bits`).
    per_channel: whether thresholds are per channel.
    sample_fraction: the fraction of each quantized tensor's entries sent.
  """
  if isinstance(bits, bit_allocation.BitBudget) and (per_channel or sample_fraction < 1.0):
    raise ValueError(
      f'`bits`={bits} chooses one width per tensor; it does not combine with `per_channel` '
      'thresholds or a `sample_fraction` below 1.'
    )


def validate_sample_fraction(sample_fraction: float, per_channel: bool = False) -> float:
  """Checks the fraction of each quantized tensor's entries sent; returns it as a float.

  Args:
    sample_fraction: a number in (0, 1]; 1 sends every entry.
    per_channel: whether thresholds are per channel, which a fraction below 1 does not support.

  Raises:
    ValueError: if `sample_fraction` is not a number in (0, 1], or is below 1 with
      `per_channel`.
  """
  if (
    isinstance(sample_fraction, bool)
    or not isinstance(sample_fraction, numbers.Real)
    or not 0.0 < float(sample_fraction) <= 1.0
  ):
    raise ValueError(
      f'`sample_fraction` must be a number in (0, 1] (the fraction of each quantized '
      f"tensor's entries a client sends; 1 sends all). Found {sample_fraction!r}."
    )
  if per_channel and sample_fraction < 1.0:
    raise ValueError(
      '`sample_fraction` below 1 sends a random subset of every quantized tensor, not whole '
      'channels, so it does not combine with `per_channel` thresholds: use one or the other. '
      f'Found sample_fraction={sample_fraction!r}.'
    )
  return float(sample_fraction)


def sent_entries(num_elements: int, sample_fraction: float) -> Optional[int]:
  """k = max(1, ceil(f n)) entries sent of `num_elements`, or None when that is all of them.

  Args:
    num_elements: n, the tensor's size.
    sample_fraction: f in (0, 1], read as the decimal it is written as (0.1 x 30 is 3).
  """
  if sample_fraction >= 1.0:
    return None
  sent = max(1, math.ceil(fractions.Fraction(repr(float(sample_fraction))) * num_elements))
  return sent if sent < num_elements else None


def make_plan(
  shapes: Sequence[Sequence[int]],
  bits: BitsSpec,
  min_size_to_quantize: int = 0,
  clipping: Union[str, float] = 'octav',
  rounding: str = 'nearest',
  per_channel: bool = False,
  sample_fraction: float = 1.0,
) -> EncodingPlan:
  """Builds the plan for tensors of `shapes`.

  Args:
    shapes: fully defined shapes of the value's tensors, in order.
    bits: one bit width for every quantized tensor, or a sequence with either one entry per
      quantized tensor (those with at least `min_size_to_quantize` elements; e.g. the paper's
      4-2-2-4 for the four kernels of its CNN) or one entry per tensor; or a
      `bit_allocation.BitBudget` (widths chosen by each client within it).
    min_size_to_quantize: tensors with fewer elements travel in float32.
    clipping: 'octav', 'octav_paper', 'max_abs', 'mean_optimal' or a fixed positive threshold.
    rounding: 'nearest' or 'stochastic'.
    per_channel: one threshold per slice of the last axis instead of one per tensor.
    sample_fraction: each quantized tensor of n entries sends k = max(1, ceil(f n)) of them.
  """
  bits = validate_encoding_settings(bits, min_size_to_quantize, clipping, rounding)
  sample_fraction = validate_sample_fraction(sample_fraction, per_channel)
  shapes = [tuple(int(d) for d in shape) for shape in shapes]
  large = [int(np.prod(s, dtype=np.int64)) >= min_size_to_quantize for s in shapes]
  validate_budget(bits, per_channel, sample_fraction)
  budget = bits if isinstance(bits, bit_allocation.BitBudget) else None
  if budget is not None:
    tensor_bits = [bit_allocation.MAX_WIDTH if is_large else None for is_large in large]
  elif isinstance(bits, tuple):
    if len(bits) == sum(large):
      per_quantized = iter(bits)
      tensor_bits = [next(per_quantized) if is_large else None for is_large in large]
    elif len(bits) == len(shapes):
      tensor_bits = [b if is_large else None for b, is_large in zip(bits, large)]
    else:
      raise ValueError(
        f'`bits` lists {len(bits)} widths; expected {sum(large)} (one per quantized tensor, '
        f'i.e. tensors with >= {min_size_to_quantize} elements) or {len(shapes)} (one per tensor).'
      )
  else:
    tensor_bits = [bits if is_large else None for is_large in large]
  if per_channel and any(b is not None and len(s) < 1 for s, b in zip(shapes, tensor_bits)):
    raise ValueError('`per_channel` quantization needs every quantized tensor to have rank >= 1.')
  return EncodingPlan(
    tensors=tuple(
      TensorEncoding(
        shape,
        b,
        None if b is None else sent_entries(int(np.prod(shape, dtype=np.int64)), sample_fraction),
      )
      for shape, b in zip(shapes, tensor_bits)
    ),
    clipping=clipping,
    rounding=rounding,
    per_channel=per_channel,
    budget=budget,
  )
