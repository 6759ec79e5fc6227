"""Bit packing of B-bit integer codes into int32 words: n codes cost ceil(n * B / 32) words.

Codes are laid out little-endian: code i occupies bits [i*B, (i+1)*B) of the concatenated word
stream (bit j of the stream is bit j % 32 of word j // 32). When B divides 32 every word holds
32 / B whole codes and packing is a shift-and-sum per word; other widths go through the bit stream.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tff_clipq.quantization import quantizer

WORD_BITS = 32


def packed_length(num_codes: int, bits: int) -> int:
  """Number of int32 words that hold `num_codes` codes of `bits` bits.

  Args:
    num_codes: number of codes to pack, >= 0.
    bits: bits per code, an integer in [1, 16].

  Returns:
    ceil(num_codes * bits / 32).

  Raises:
    ValueError: if `bits` is not in [1, 16] or `num_codes` is negative.
  """
  quantizer.validate_bits(bits)
  if num_codes < 0:
    raise ValueError(f'`num_codes` must be >= 0. Found {num_codes}.')
  return -(-num_codes * bits // WORD_BITS)


def _shifts(count: int, stride: int) -> tf.Tensor:
  """uint32 shift amounts 0, stride, 2 stride, ... (`tf.range` has no uint32 kernel)."""
  return tf.constant(np.arange(count, dtype=np.uint32) * stride)


def pack_codes(codes: tf.Tensor, bits: int) -> tf.Tensor:
  """Packs integer codes in [0, 2^bits - 1] (any shape, read flat) into an int32 vector.

  The arithmetic is on uint32 (logical shifts, sums that cannot overflow), half the memory
  traffic of int64.

  Args:
    codes: integer tensor of codes in [0, 2^bits - 1], any shape; read in row-major order.
    bits: bits per code, an integer in [1, 16].

  Returns:
    int32 vector of `packed_length(tf.size(codes), bits)` words; unused high bits are zero.

  Raises:
    ValueError: if `bits` is not in [1, 16].
    TypeError: if `codes` does not have an integer dtype.
  """
  bits = quantizer.validate_bits(bits)
  codes = tf.convert_to_tensor(codes)
  if not codes.dtype.is_integer:
    raise TypeError(f'`codes` must be an integer tensor. Found dtype {codes.dtype.name}.')
  flat = tf.cast(tf.reshape(codes, [-1]), tf.uint32)
  num_codes = tf.size(flat, out_type=tf.int64)
  num_words = (num_codes * bits + WORD_BITS - 1) // WORD_BITS
  if WORD_BITS % bits == 0:
    codes_per_word = WORD_BITS // bits
    padded = tf.pad(flat, [[0, num_words * codes_per_word - num_codes]])
    fields = tf.bitwise.left_shift(
      tf.reshape(padded, [-1, codes_per_word]), _shifts(codes_per_word, bits)
    )
  else:
    bit_stream = tf.reshape(
      tf.bitwise.bitwise_and(tf.bitwise.right_shift(flat[:, None], _shifts(bits, 1)), 1), [-1]
    )
    padded = tf.pad(bit_stream, [[0, num_words * WORD_BITS - num_codes * bits]])
    fields = tf.bitwise.left_shift(tf.reshape(padded, [-1, WORD_BITS]), _shifts(WORD_BITS, 1))
  # Fields occupy disjoint bits, so their sum is their bitwise OR.
  return tf.bitcast(tf.reduce_sum(fields, axis=1), tf.int32)


def unpack_codes(words: tf.Tensor, bits: int, num_codes: int) -> tf.Tensor:
  """Inverse of `pack_codes`: the first `num_codes` codes as an int32 vector.

  Args:
    words: int32 tensor of packed words, as returned by `pack_codes` (read flat).
    bits: bits per code that the words were packed with, an integer in [1, 16].
    num_codes: number of codes to read from the start of the bit stream.

  Returns:
    int32 vector of length `num_codes`, values in [0, 2^bits - 1].

  Raises:
    ValueError: if `bits` is not in [1, 16].
    TypeError: if `words` is not an int32 tensor.
  """
  bits = quantizer.validate_bits(bits)
  words = tf.convert_to_tensor(words)
  if words.dtype != tf.int32:
    raise TypeError(f'`words` must be an int32 tensor. Found dtype {words.dtype.name}.')
  values = tf.bitcast(tf.reshape(words, [-1]), tf.uint32)
  mask = tf.constant((1 << bits) - 1, tf.uint32)
  if WORD_BITS % bits == 0:
    shifts = _shifts(WORD_BITS // bits, bits)
    codes = tf.bitwise.bitwise_and(tf.bitwise.right_shift(values[:, None], shifts), mask)
    return tf.cast(tf.reshape(codes, [-1])[:num_codes], tf.int32)
  bit_stream = tf.bitwise.bitwise_and(
    tf.bitwise.right_shift(values[:, None], _shifts(WORD_BITS, 1)), 1
  )
  code_bits = tf.reshape(tf.reshape(bit_stream, [-1])[: num_codes * bits], [num_codes, bits])
  codes = tf.reduce_sum(tf.bitwise.left_shift(code_bits, _shifts(bits, 1)), axis=1)
  return tf.cast(codes, tf.int32)
