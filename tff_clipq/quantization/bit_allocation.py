"""Bit widths allocated by an error budget, and codes of mixed widths in one fixed-length buffer.

With `bits='budget:1.5'` a client spends on average 1.5 code bits per quantized coordinate, but
not equally: `allocate_widths` gives each tensor the width (1 to `MAX_WIDTH`) that minimizes the
total squared error of the value it sends, the sum over tensors of n_t x MSE_t(b_t), subject to
sum n_t b_t <= the budget. `candidate_errors` measures that error for every tensor at every
width (each with its own clipping threshold). Up to `EXHAUSTIVE_TENSORS` quantized tensors the
allocation tries every combination of widths (exact); beyond, it is greedy, one bit at a time to
the tensor whose next bit removes the most error per bit spent (not always optimal: a budget that
the best step no longer fits can strand bits).

Because the budget fixes the total number of code bits, `pack_mixed_widths` lays every tensor's
codes at its own width into one buffer whose length depends only on the budget, so the upload
keeps a static TFF type; the widths travel beside it.
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_clipq.quantization import packing
from tff_clipq.quantization import thresholds as thresholds_lib

BUDGET_PREFIX = 'budget:'
# Widths the allocator chooses from: 1..MAX_WIDTH.
MAX_WIDTH = 8
# Up to this many tensors every combination of widths is tried (MAX_WIDTH^5 = 32,768).
EXHAUSTIVE_TENSORS = 5


@dataclasses.dataclass(frozen=True)
class BitBudget:
  """An average number of code bits per quantized coordinate, in [1, MAX_WIDTH]."""

  average: float

  def total_bits(self, num_coordinates: int) -> int:
    """floor(average x n): the code bits a client may spend on `num_coordinates` entries.

    Args:
      num_coordinates: the number of quantized entries.
    """
    return int(fractions.Fraction(repr(self.average)) * num_coordinates)

  def __str__(self) -> str:
    return f'{BUDGET_PREFIX}{self.average:g}'


def is_budget(bits: object) -> bool:
  """Whether `bits` (as a user writes it) asks for widths allocated by a budget."""
  return isinstance(bits, BitBudget) or (
    isinstance(bits, str) and bits.strip().startswith(BUDGET_PREFIX)
  )


def parse_budget(text: str) -> BitBudget:
  """'budget:1.5' -> BitBudget(1.5); raises ValueError for anything else.

  Args:
    text: 'budget:' followed by the average code bits per quantized coordinate, 1 to MAX_WIDTH.
  """
  number = text.strip()[len(BUDGET_PREFIX) :]
  try:
    average = float(number)
  except ValueError:
    average = float('nan')
  if not 1.0 <= average <= MAX_WIDTH:
    raise ValueError(
      f'`bits` as a budget is budget:<average bits per coordinate>, a number from 1 to '
      f'{MAX_WIDTH}, e.g. budget:2.15. Found {text!r}.'
    )
  return BitBudget(average)


def candidate_errors(
  tensors: Sequence[tf.Tensor],
  clipping: object,
  rounding: str,
  num_clients: object = 1,
) -> tuple[tf.Tensor, tf.Tensor]:
  """(thresholds, errors), both [T, MAX_WIDTH]: each tensor at each width 1..MAX_WIDTH.

  errors[t, b - 1] is n_t x the expected MSE of tensor t quantized with b bits at its threshold
  for b bits (`thresholds.expected_quantization_mse`): the squared error it adds to the value.

  Args:
    tensors: the finite tensors to be quantized (per-tensor thresholds).
    clipping: the threshold method or a fixed threshold (`thresholds.clipping_thresholds`).
    rounding: 'nearest' or 'stochastic'.
    num_clients: K for `clipping='mean_optimal'`.
  """
  by_width = []
  for bits in range(1, MAX_WIDTH + 1):
    found = thresholds_lib.clipping_thresholds(
      tensors, bits, clipping, rounding, all_finite=True, num_clients=num_clients
    )
    errors = [
      float(np.prod(x.shape)) * thresholds_lib.expected_quantization_mse(x, s, bits, rounding)
      for x, s in zip(tensors, found)
    ]
    by_width.append((tf.stack(found), tf.stack(errors)))
  return (
    tf.stack([found for found, _ in by_width], axis=1),
    tf.stack([errors for _, errors in by_width], axis=1),
  )


def allocate_widths(errors: tf.Tensor, sizes: Sequence[int], total_bits: int) -> tf.Tensor:
  """Widths [T] (int32, 1..MAX_WIDTH) of least total error with sum sizes x widths <= total_bits.

  Exhaustive up to `EXHAUSTIVE_TENSORS` tensors (`best_widths`), else `greedy_widths`.

  Args:
    errors: [T, MAX_WIDTH] squared error of each tensor at each width (`candidate_errors`).
    sizes: n_t, the number of entries of each tensor.
    total_bits: the budget in code bits; at least sum(sizes).
  """
  if total_bits < sum(sizes):
    raise ValueError(f'A budget of {total_bits} bits is below 1 bit for each of {sum(sizes)}.')
  if len(sizes) <= EXHAUSTIVE_TENSORS:
    return best_widths(errors, sizes, total_bits)
  return greedy_widths(errors, sizes, total_bits)


def best_widths(errors: tf.Tensor, sizes: Sequence[int], total_bits: int) -> tf.Tensor:
  """The widths of least total error within the budget, trying every combination.

  Args:
    errors: [T, MAX_WIDTH] squared error of each tensor at each width.
    sizes: n_t of each tensor.
    total_bits: the budget in code bits; at least sum(sizes).
  """
  grids = np.meshgrid(*[np.arange(1, MAX_WIDTH + 1)] * len(sizes), indexing='ij')
  combinations = np.stack([grid.reshape(-1) for grid in grids], axis=1).astype(np.int32)
  fits = combinations.astype(np.int64) @ np.asarray(sizes, np.int64) <= total_bits
  combinations = combinations[fits]  # Never empty: all ones fits.
  errors = tf.cast(errors, tf.float64)
  totals = tf.add_n([tf.gather(errors[t], combinations[:, t] - 1) for t in range(len(sizes))])
  return tf.gather(tf.constant(combinations), tf.argmin(totals))


def greedy_widths(errors: tf.Tensor, sizes: Sequence[int], total_bits: int) -> tf.Tensor:
  """Widths within the budget, one bit at a time to the best error removed per bit.

  Every tensor starts at 1 bit; then, while the budget allows, the tensor whose next bit removes
  the most error per bit spent ((errors[t, b] - errors[t, b + 1]) / n_t) gets it. A step that
  removes no error is never taken.

  Args:
    errors: [T, MAX_WIDTH] squared error of each tensor at each width (`candidate_errors`).
    sizes: n_t, the number of entries of each tensor.
    total_bits: the budget in code bits; at least sum(sizes).
  """
  errors = tf.cast(errors, tf.float64)
  sizes_int = tf.constant(sizes, tf.int64)
  sizes_float = tf.cast(sizes_int, tf.float64)
  num_tensors = len(sizes)

  def step(widths, used, _):
    current = tf.gather(errors, widths - 1, batch_dims=1)
    following = tf.gather(errors, tf.minimum(widths, MAX_WIDTH - 1), batch_dims=1)
    gain = (current - following) / sizes_float
    feasible = (widths < MAX_WIDTH) & (used + sizes_int <= total_bits) & (gain > 0.0)
    chosen = tf.argmax(tf.where(feasible, gain, -1.0), output_type=tf.int32)
    progress = tf.reduce_any(feasible)
    one_more = tf.one_hot(chosen, num_tensors, dtype=tf.int32) * tf.cast(progress, tf.int32)
    return widths + one_more, used + tf.cast(progress, tf.int64) * sizes_int[chosen], progress

  widths, _, _ = tf.while_loop(
    lambda widths, used, progress: progress,
    step,
    (tf.ones([num_tensors], tf.int32), tf.reduce_sum(sizes_int), tf.constant(num_tensors > 0)),
    maximum_iterations=num_tensors * (MAX_WIDTH - 1),
  )
  return widths


def _bit_shifts(count: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.range(count), tf.uint32)


def pack_mixed_widths(codes: Sequence[tf.Tensor], widths: tf.Tensor, num_words: int) -> tf.Tensor:
  """Codes of tensor t at widths[t] bits each, consecutively, in `num_words` int32 words.

  The layout is `packing`'s little-endian bit stream: tensor 0's codes first, each code's bits
  low to high; unused bits at the end are zero.

  Args:
    codes: per tensor, its integer codes in [0, 2^widths[t] - 1] (read flat).
    widths: int32 [T], the width of each tensor's codes.
    num_words: the buffer's length; must hold sum n_t widths[t] bits.
  """
  streams = []
  for position, tensor_codes in enumerate(codes):
    flat = tf.cast(tf.reshape(tensor_codes, [-1]), tf.uint32)
    bits = tf.bitwise.right_shift(flat[:, None], _bit_shifts(widths[position])[None, :])
    streams.append(tf.reshape(tf.bitwise.bitwise_and(bits, 1), [-1]))
  stream = tf.concat(streams, axis=0) if streams else tf.zeros([0], tf.uint32)
  capacity = num_words * packing.WORD_BITS
  stream = tf.pad(stream, [[0, capacity - tf.size(stream)]])
  fields = tf.bitwise.left_shift(
    tf.reshape(stream, [num_words, packing.WORD_BITS]), _bit_shifts(packing.WORD_BITS)
  )
  return tf.bitcast(tf.reduce_sum(fields, axis=1), tf.int32)  # Disjoint bits: sum is OR.


def _bit_stream(words: tf.Tensor) -> tf.Tensor:
  unsigned = tf.bitcast(words, tf.uint32)
  bits = tf.bitwise.right_shift(unsigned[:, None], _bit_shifts(packing.WORD_BITS)[None, :])
  return tf.reshape(tf.bitwise.bitwise_and(bits, 1), [-1])


def used_bits(widths: tf.Tensor, sizes: Sequence[int]) -> tf.Tensor:
  """sum n_t widths[t] (int64): the code bits `pack_mixed_widths` fills.

  Args:
    widths: int32 [T].
    sizes: n_t of each tensor.
  """
  return tf.reduce_sum(tf.cast(widths, tf.int64) * tf.constant(sizes, tf.int64))


def widths_are_valid(widths: tf.Tensor, sizes: Sequence[int], words: tf.Tensor) -> tf.Tensor:
  """True when every width is in 1..MAX_WIDTH, the codes fit in `words` and no spare bit is set.

  Args:
    widths: int32 [T] as received.
    sizes: n_t of each tensor.
    words: the received int32 buffer.
  """
  in_range = tf.reduce_all((widths >= 1) & (widths <= MAX_WIDTH))
  safe = tf.where(in_range, widths, tf.ones_like(widths))
  capacity = tf.cast(tf.size(words), tf.int64) * packing.WORD_BITS
  used = used_bits(safe, sizes)
  stream = _bit_stream(words)
  spare = tf.range(capacity) >= used
  spare_clear = tf.logical_not(tf.reduce_any(spare & tf.not_equal(stream, 0)))
  return in_range & (used <= capacity) & spare_clear


def unpack_mixed_widths(
  words: tf.Tensor, widths: tf.Tensor, sizes: Sequence[int]
) -> list[tf.Tensor]:
  """Inverse of `pack_mixed_widths`: per tensor its n_t codes (int32) at widths[t] bits.

  The widths must be valid for `words` (`widths_are_valid`).

  Args:
    words: the int32 buffer.
    widths: int32 [T].
    sizes: n_t of each tensor.
  """
  stream = _bit_stream(words)
  codes, offset = [], tf.constant(0, tf.int64)
  for position, size in enumerate(sizes):
    width = widths[position]
    length = tf.cast(width, tf.int64) * size
    segment = tf.reshape(tf.slice(stream, [offset], [length]), [size, width])
    shifted = tf.bitwise.left_shift(segment, _bit_shifts(width)[None, :])
    codes.append(tf.cast(tf.reduce_sum(shifted, axis=1), tf.int32))
    offset += length
  return codes
