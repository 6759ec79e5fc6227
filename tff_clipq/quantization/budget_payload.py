"""A client value encoded under a bit budget: widths chosen by each client, one packed buffer.

With an `EncodingPlan` whose `budget` is set (`bits='budget:1.5'`), each client measures every
quantized tensor's error at every width (`bit_allocation.candidate_errors`), allocates the widths
of least total error within the budget, quantizes each tensor at its width and that width's
threshold, and packs all codes into one buffer of `plan.budget_words` words. The choice is made
by each client, on its own value, every round: the errors depend on the values being sent, no
statistic has to reach the server first, and no state is kept; the widths travel with the codes.

The wire part is OrderedDict(codes=int32 [budget_words], widths=int32 [T], thresholds=float32
[T]), a static TFF type whatever the widths. Pure TensorFlow, like `payload.py`.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import tensorflow as tf

from tff_clipq.quantization import bit_allocation
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import payload as payload_lib
from tff_clipq.quantization import quantizer


def _quantize_at_width(
  value: tf.Tensor, width: tf.Tensor, threshold: tf.Tensor, rounding: str, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(codes, mse, clipped fraction) of `value` at a width known only in the graph."""

  def at(bits):
    quantized, error, clipped = quantizer.quantize_and_measure(
      value, bits, threshold, rounding, seed, all_finite=True
    )
    return tf.reshape(quantized.codes, [-1]), error, clipped

  branches = [lambda bits=bits: at(bits) for bits in range(1, bit_allocation.MAX_WIDTH + 1)]
  return tf.switch_case(width - 1, branches)


def encode_tensors(
  plan: encoding_plan.EncodingPlan,
  tensors: Sequence[tf.Tensor],
  seed: tf.Tensor,
  takes_part: Optional[tf.Tensor] = None,
  num_clients: Optional[tf.Tensor] = None,
) -> tuple[collections.OrderedDict, list, collections.OrderedDict, tf.Tensor]:
  """Encodes a client's tensors within `plan.budget`.

  Args:
    plan: an `EncodingPlan` with a `budget`.
    tensors: the value's tensors, in the plan's order.
    seed: stateless RNG seed [2] for stochastic rounding.
    takes_part: optional scalar bool; False rejects the client like a non-finite input does.
    num_clients: the number of clients averaged, for `clipping='mean_optimal'` (None means 1).

  Returns:
    (part, floats, statistics, accepted) as `payload.encode_tensors` returns them, except that
    the quantized tensors travel as one part: OrderedDict(codes, widths, thresholds).
  """
  tensors, accepted, finite = payload_lib.accepted_inputs(plan, tensors, takes_part)
  values = [tf.reshape(finite[index], [-1]) for index in plan.quantized_indices]
  sizes = [t.num_elements for t in plan.quantized]
  candidates, errors = bit_allocation.candidate_errors(
    values, plan.clipping, plan.rounding, 1 if num_clients is None else num_clients
  )
  widths = bit_allocation.allocate_widths(errors, sizes, plan.budget_bits)
  codes, mse, clipped, chosen = [], [], [], []
  for position, value in enumerate(values):
    width = widths[position]
    threshold = tf.cast(candidates[position, width - 1], tf.float32)
    tensor_seed = seed + tf.constant([0, position], tf.int64)
    tensor_codes, error, clipped_fraction = _quantize_at_width(
      value, width, threshold, plan.rounding, tensor_seed
    )
    codes.append(tensor_codes)
    chosen.append(threshold)
    mse.append(error)
    clipped.append(clipped_fraction)
  part = collections.OrderedDict(
    codes=payload_lib.cleared(
      accepted, bit_allocation.pack_mixed_widths(codes, widths, plan.budget_words)
    ),
    widths=widths,
    thresholds=payload_lib.cleared(accepted, tf.stack(chosen)),
  )
  statistics = payload_lib.client_statistics(values, sizes, mse, clipped, accepted)
  floats = [payload_lib.cleared(accepted, tensors[index]) for index in plan.float_indices]
  return part, floats, statistics, accepted


def is_well_formed(plan: encoding_plan.EncodingPlan, part: collections.OrderedDict) -> tf.Tensor:
  """True when the widths are valid for the buffer and every threshold is finite and >= 0.

  Args:
    plan: an `EncodingPlan` with a `budget`.
    part: the received OrderedDict(codes, widths, thresholds).
  """
  sizes = [t.num_elements for t in plan.quantized]
  thresholds = part['thresholds']
  return tf.reduce_all(
    [
      bit_allocation.widths_are_valid(part['widths'], sizes, part['codes']),
      tf.reduce_all(tf.math.is_finite(thresholds)),
      tf.reduce_all(thresholds >= 0.0),
    ]
  )


def unpack(
  plan: encoding_plan.EncodingPlan, part: collections.OrderedDict, valid: tf.Tensor
) -> tuple[tf.Tensor, list[tf.Tensor]]:
  """(widths, codes per quantized tensor) of a part; an invalid part unpacks as 1-bit zeros.

  Args:
    plan: an `EncodingPlan` with a `budget`.
    part: the received OrderedDict(codes, widths, thresholds).
    valid: scalar bool, e.g. `is_well_formed` (malformed widths must not reach the unpacking).
  """
  sizes = [t.num_elements for t in plan.quantized]
  widths = tf.where(valid, part['widths'], tf.ones_like(part['widths']))
  words = tf.where(valid, part['codes'], tf.zeros_like(part['codes']))
  return widths, bit_allocation.unpack_mixed_widths(words, widths, sizes)


def weighted_levels(
  encoding: encoding_plan.TensorEncoding,
  codes: tf.Tensor,
  width: tf.Tensor,
  threshold: tf.Tensor,
  weight: tf.Tensor,
) -> tf.Tensor:
  """`weight` x the levels (code - h) s / h, h = (2^width - 1) / 2, in the tensor's shape.

  Args:
    encoding: the tensor's `TensorEncoding` (its shape).
    codes: its int32 codes (flat).
    width: its width (int32 scalar).
    threshold: its threshold s.
    weight: float32 scalar factor.
  """
  half_max_code = 0.5 * tf.cast(tf.bitwise.left_shift(1, width) - 1, tf.float32)
  centred = tf.reshape(tf.cast(codes, tf.float32), encoding.shape) - half_max_code
  return centred * (weight * threshold / half_max_code)


def decode(plan: encoding_plan.EncodingPlan, part: collections.OrderedDict) -> list[tf.Tensor]:
  """The decoded float32 tensors, one per quantized tensor of `plan` (a well-formed part).

  Args:
    plan: an `EncodingPlan` with a `budget`.
    part: OrderedDict(codes, widths, thresholds) from `encode_tensors`.
  """
  widths, codes = unpack(plan, part, tf.constant(True))
  return [
    weighted_levels(encoding, codes[i], widths[i], part['thresholds'][i], 1.0)
    for i, encoding in enumerate(plan.quantized)
  ]
