"""Bit packing of B-bit integer codes into int32 words: n codes cost ceil(n * B / 32) words.

Codes are laid out little-endian: code i occupies bits [i*B, (i+1)*B) of the concatenated word
stream (bit j of the stream is bit j % 32 of word j // 32). When B divides 32 every word holds
32 / B whole codes and packing is a shift-and-sum per word; other widths go through the bit stream.
"""

from __future__ import annotations

import tensorflow as tf

from tff_clipq.quantization import quantizer

WORD_BITS = 32


def packed_length(num_codes: int, bits: int) -> int:
  """Number of int32 words that hold `num_codes` codes of `bits` bits."""
  quantizer.validate_bits(bits)
  if num_codes < 0:
    raise ValueError(f'`num_codes` must be >= 0. Found {num_codes}.')
  return -(-num_codes * bits // WORD_BITS)


def _words_from_uint32_values(values: tf.Tensor) -> tf.Tensor:
  """int64 values in [0, 2^32) -> int32 words with the same bit pattern."""
  return tf.bitcast(tf.cast(values, tf.uint32), tf.int32)


def _uint32_values_from_words(words: tf.Tensor) -> tf.Tensor:
  """int32 words -> int64 values in [0, 2^32) with the same bit pattern."""
  return tf.cast(tf.bitcast(words, tf.uint32), tf.int64)


def pack_codes(codes: tf.Tensor, bits: int) -> tf.Tensor:
  """Packs integer codes in [0, 2^bits - 1] (any shape, read flat) into an int32 vector."""
  bits = quantizer.validate_bits(bits)
  codes = tf.convert_to_tensor(codes)
  if not codes.dtype.is_integer:
    raise TypeError(f'`codes` must be an integer tensor. Found dtype {codes.dtype.name}.')
  flat = tf.cast(tf.reshape(codes, [-1]), tf.int64)
  num_codes = tf.size(flat, out_type=tf.int64)
  num_words = (num_codes * bits + WORD_BITS - 1) // WORD_BITS
  if WORD_BITS % bits == 0:
    codes_per_word = WORD_BITS // bits
    padded = tf.pad(flat, [[0, num_words * codes_per_word - num_codes]])
    shifts = tf.range(codes_per_word, dtype=tf.int64) * bits
    fields = tf.bitwise.left_shift(tf.reshape(padded, [-1, codes_per_word]), shifts)
  else:
    bit_positions = tf.range(bits, dtype=tf.int64)
    bit_stream = tf.reshape(tf.bitwise.bitwise_and(tf.bitwise.right_shift(flat[:, None], bit_positions), 1), [-1])
    padded = tf.pad(bit_stream, [[0, num_words * WORD_BITS - num_codes * bits]])
    fields = tf.bitwise.left_shift(
        tf.reshape(padded, [-1, WORD_BITS]), tf.range(WORD_BITS, dtype=tf.int64)
    )
  # Fields occupy disjoint bits, so their sum is their bitwise OR.
  return _words_from_uint32_values(tf.reduce_sum(fields, axis=1))


def unpack_codes(words: tf.Tensor, bits: int, num_codes: int) -> tf.Tensor:
  """Inverse of `pack_codes`: the first `num_codes` codes as an int32 vector."""
  bits = quantizer.validate_bits(bits)
  words = tf.convert_to_tensor(words)
  if words.dtype != tf.int32:
    raise TypeError(f'`words` must be an int32 tensor. Found dtype {words.dtype.name}.')
  values = _uint32_values_from_words(tf.reshape(words, [-1]))
  mask = (1 << bits) - 1
  if WORD_BITS % bits == 0:
    shifts = tf.range(WORD_BITS // bits, dtype=tf.int64) * bits
    codes = tf.bitwise.bitwise_and(tf.bitwise.right_shift(values[:, None], shifts), mask)
    return tf.cast(tf.reshape(codes, [-1])[:num_codes], tf.int32)
  bit_stream = tf.bitwise.bitwise_and(
      tf.bitwise.right_shift(values[:, None], tf.range(WORD_BITS, dtype=tf.int64)), 1
  )
  code_bits = tf.reshape(tf.reshape(bit_stream, [-1])[: num_codes * bits], [num_codes, bits])
  codes = tf.reduce_sum(
      tf.bitwise.left_shift(code_bits, tf.range(bits, dtype=tf.int64)), axis=1
  )
  return tf.cast(codes, tf.int32)
