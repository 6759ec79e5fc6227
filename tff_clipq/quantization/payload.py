"""Encoding of a whole client value (a list of tensors) into a compact, checkable payload.

An `EncodingPlan` fixes, for every tensor of a value (e.g. a model's trainable weights), whether
it is quantized and with how many bits. Tensors with fewer than `min_size_to_quantize` elements
(biases) stay in float32. A quantized tensor travels as its bit-packed codes plus its clipping
threshold; `decode_quantized` inverts this and `payload_is_well_formed` checks what a receiver can
check: finite, non-negative thresholds and zero padding bits.

With a `sample_fraction` f < 1 a quantized tensor of n entries sends the codes of only
k = max(1, ceil(f n)) of them, chosen uniformly without replacement by a stateless shuffle whose
seed the receiver derives from one int32 the sender includes (`selection_seed`,
`selected_coordinates`); no index travels. The receiver scatters the decoded levels back, scaled
by n / k, so that over the choice of coordinates the decoded tensor is unbiased.

Pure TensorFlow: the TFF factories in `tff_clipq.aggregators` wire these functions into
computations.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import math
import numbers
from typing import Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from tff_clipq.quantization import packing
from tff_clipq.quantization import quantizer
from tff_clipq.quantization import thresholds

BitsSpec = Union[int, Sequence[int]]
# First entries of the stateless seeds of the coordinate selection. The rounding seeds start with
# the round's seed (a small counter), so the two kinds of draws do not share a seed.
_SELECTION_SEED_KEY = 0x5E1EC7_0000
_COORDINATES_KEY = 0x5E1EC7_0001


@dataclasses.dataclass(frozen=True)
class TensorEncoding:
  """How one tensor travels: `bits=None` means float32, unquantized.

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

  @property
  def quantized(self) -> tuple[TensorEncoding, ...]:
    return tuple(t for t in self.tensors if t.bits is not None)

  @property
  def quantized_indices(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.tensors) if t.bits is not None)

  @property
  def float_indices(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.tensors) if t.bits is None)

  @property
  def num_coordinates(self) -> int:
    return sum(t.num_elements for t in self.tensors)

  @property
  def sampled(self) -> bool:
    """Whether any tensor sends a subset of its entries (the payload then carries a seed)."""
    return any(t.sampled for t in self.tensors)


def parse_bits(bits: Union[BitsSpec, str]) -> BitsSpec:
  """Accepts an int, a sequence of ints, or a dash-separated string like the paper's '4-2-2-4'."""
  if isinstance(bits, str):
    try:
      parts = [int(part) for part in bits.split('-')]
    except ValueError:
      raise ValueError(
        f'`bits` must be an integer or a dash-separated list like 4-2-2-4. Found {bits!r}.'
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
    bits: an int, a sequence of ints, or a dash-separated string like '4-2-2-4'; each in 1..16.
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
      4-2-2-4 for the four kernels of its CNN) or one entry per tensor.
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
  if isinstance(bits, tuple):
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
  )


def client_seed(round_seed: tf.Tensor, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """A stateless seed [2] from the round and the client's own data, so runs are reproducible.

  Args:
    round_seed: integer scalar seed of the round; becomes the first entry.
    tensors: the client's tensors; the sum of their fingerprints becomes the second entry.

  Returns:
    int64 tensor of shape [2].
  """
  # Fingerprint hashes each row's bytes, whatever the dtype.
  fingerprints = [tf.bitcast(tf.fingerprint(tf.reshape(t, [1, -1]))[0], tf.int64) for t in tensors]
  return tf.stack([tf.cast(round_seed, tf.int64), tf.math.add_n(fingerprints)])


def selection_seed(seed: tf.Tensor) -> tf.Tensor:
  """The int32 a client sends from which the receiver derives the coordinates it sent.

  Drawn from the client's stateless seed (`client_seed`: the round's seed and its data), so it
  changes every round, differs between clients, and repeats for a rerun.

  Args:
    seed: the client's stateless seed [2] (int64).
  """
  seed = tf.random.experimental.stateless_fold_in(seed, _SELECTION_SEED_KEY)
  return tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int32)


def selected_coordinates(
  encoding: TensorEncoding, selection: tf.Tensor, position: int
) -> tf.Tensor:
  """Indices into the flattened tensor of the `encoding.sent` entries sent (int32 [k]).

  The first k entries of a stateless uniform shuffle of 0..n-1: a uniformly random subset,
  drawn without replacement, that sender and receiver both compute from the sent seed.

  Args:
    encoding: the tensor's `TensorEncoding` (must be `sampled`).
    selection: the int32 scalar the sender sent (`selection_seed`).
    position: the tensor's position among the plan's quantized tensors (a fresh draw each).
  """
  seed = tf.stack(
    [tf.constant(_COORDINATES_KEY + position, tf.int64), tf.cast(selection, tf.int64)]
  )
  everything = tf.range(encoding.num_elements, dtype=tf.int32)
  return tf.random.experimental.stateless_shuffle(everything, seed)[: encoding.sent]


def encode_tensors(
  plan: EncodingPlan,
  tensors: Sequence[tf.Tensor],
  seed: tf.Tensor,
  takes_part: Optional[tf.Tensor] = None,
  num_clients: Optional[tf.Tensor] = None,
  selection: Optional[tf.Tensor] = None,
) -> tuple[list, list, collections.OrderedDict, tf.Tensor]:
  """Encodes a client's tensors.

  Args:
    plan: the value's `EncodingPlan`.
    tensors: the value's tensors, in the plan's order.
    seed: stateless RNG seed [2] for stochastic rounding.
    takes_part: optional scalar bool; False rejects the client like a non-finite input does.
    num_clients: the number of clients whose values the server averages, for
      `clipping='mean_optimal'` (scalar; None means 1); other clipping methods ignore it.
    selection: the int32 seed of the coordinates sent (`selection_seed`), needed when the plan
      is `sampled`: such a tensor is reduced to its selected entries (flattened) before its
      threshold is found and it is quantized, and its statistics are those of these entries.

  Returns:
    (quantized, floats, statistics, accepted): `quantized` lists an OrderedDict(codes=int32 words,
    threshold) per quantized tensor; `floats` the unquantized tensors; `statistics` per-quantized-
    tensor vectors quantization_mse, normalized_mse and clipped_fraction (the realized error of
    this encoding); `accepted` is False when any input is non-finite or `takes_part` is False,
    and then every part is zero. (A rejected client's tensors are searched and quantized as
    zeros, so the search and the quantizer skip their per-entry handling of non-finite entries.)
  """
  tensors = [tf.cast(t, tf.float32) for t in tensors]
  accepted = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])
  if takes_part is not None:
    accepted = tf.logical_and(accepted, takes_part)
  cleared = lambda t: tf.where(accepted, t, tf.zeros_like(t))
  # x * 1 = x, and multiply_no_nan gives 0 for a zero factor even where x is NaN or Inf.
  finite = {
    index: tf.math.multiply_no_nan(tensors[index], tf.cast(accepted, tf.float32))
    for index in plan.quantized_indices
  }
  if plan.sampled and selection is None:
    raise ValueError('A plan with a `sample_fraction` below 1 needs the `selection` seed.')
  for position, index in enumerate(plan.quantized_indices):
    encoding = plan.tensors[index]
    if encoding.sampled:
      coordinates = selected_coordinates(encoding, selection, position)
      finite[index] = tf.gather(tf.reshape(finite[index], [-1]), coordinates)
  threshold_of = {}
  for bits in sorted({plan.tensors[index].bits for index in plan.quantized_indices}):
    indices = [index for index in plan.quantized_indices if plan.tensors[index].bits == bits]
    found = thresholds.clipping_thresholds(
      [finite[index] for index in indices],
      bits,
      plan.clipping,
      plan.rounding,
      plan.per_channel,
      all_finite=True,
      num_clients=1 if num_clients is None else num_clients,
    )
    threshold_of.update(zip(indices, found))
  quantized, mse, normalized, clipped = [], [], [], []
  for position, index in enumerate(plan.quantized_indices):
    encoding, value, threshold = plan.tensors[index], finite[index], threshold_of[index]
    tensor_seed = seed + tf.constant([0, position], tf.int64)
    codes, error, clipped_fraction = quantizer.quantize_and_measure(
      value, encoding.bits, threshold, plan.rounding, tensor_seed, all_finite=True
    )
    quantized.append(
      collections.OrderedDict(
        codes=cleared(packing.pack_codes(codes.codes, encoding.bits)),
        threshold=cleared(threshold),
      )
    )
    mse.append(error)
    mean_square = quantizer.square_sum(value) / max(encoding.num_sent, 1)
    normalized.append(tf.math.divide_no_nan(error, mean_square))
    clipped.append(clipped_fraction)
  statistics = collections.OrderedDict(
    quantization_mse=cleared(tf.stack(mse)) if mse else tf.zeros([0]),
    normalized_mse=cleared(tf.stack(normalized)) if normalized else tf.zeros([0]),
    clipped_fraction=cleared(tf.stack(clipped)) if clipped else tf.zeros([0]),
  )
  floats = [cleared(tensors[index]) for index in plan.float_indices]
  return quantized, floats, statistics, accepted


def _scattered(encoding: TensorEncoding, sent_values: tf.Tensor, coordinates: tf.Tensor):
  """The sent entries' values at their coordinates, scaled by n / k; zeros elsewhere."""
  scale = encoding.num_elements / encoding.num_sent
  return tf.reshape(
    tf.scatter_nd(coordinates[:, None], sent_values * scale, [encoding.num_elements]),
    encoding.shape,
  )


def decode_quantized(
  plan: EncodingPlan,
  quantized: Sequence[collections.OrderedDict],
  selection: Optional[tf.Tensor] = None,
) -> list[tf.Tensor]:
  """Unpacks and dequantizes each quantized tensor back to float32 of its original shape.

  Args:
    plan: the value's `EncodingPlan`.
    quantized: one OrderedDict(codes=int32 words, threshold) per quantized tensor of `plan`,
      in order, as returned by `encode_tensors`.
    selection: the sender's `selection_seed`, when the plan is `sampled`; a sampled tensor's
      decoded entries are scattered back scaled by n / k (zeros elsewhere).

  Returns:
    The decoded float32 tensors, one per quantized tensor of `plan`.
  """
  decoded = []
  for position, (encoding, part) in enumerate(zip(plan.quantized, quantized)):
    codes = packing.unpack_codes(part['codes'], encoding.bits, encoding.num_sent)
    if encoding.sampled:
      levels = quantizer.dequantize_codes(codes, part['threshold'], encoding.bits, tf.float32)
      coordinates = selected_coordinates(encoding, selection, position)
      decoded.append(_scattered(encoding, levels, coordinates))
      continue
    codes = tf.reshape(codes, encoding.shape)
    decoded.append(quantizer.dequantize_codes(codes, part['threshold'], encoding.bits, tf.float32))
  return decoded


def weighted_levels(
  encoding: TensorEncoding,
  part: collections.OrderedDict,
  weight: tf.Tensor,
  coordinates: Optional[tf.Tensor] = None,
) -> tf.Tensor:
  """`weight` x the decoded levels of one quantized tensor, formed on its codes.

  A level is affine in its code: (code - h) s / h with h = (2^B - 1) / 2. One scalar per tensor,
  weight x s / h, therefore turns the centred codes into weighted levels, without the per-entry
  branches of `dequantize_codes` (which make the outermost levels exactly +-s) or a second
  multiply: a server's weighted sum costs about 50 us less per client for a 40,000-entry tensor.
  Equal to weight x `decode_quantized` up to float rounding.

  Args:
    encoding: the tensor's `TensorEncoding` (shape and bits; must be quantized).
    part: the tensor's OrderedDict(codes=int32 words, threshold) from `encode_tensors`.
    weight: float32 scalar factor applied to the levels.
    coordinates: for a `sampled` encoding, the entries sent (`selected_coordinates`): the
      weighted levels are scattered there, scaled by n / k, with zeros elsewhere.

  Returns:
    float32 tensor of the encoding's shape.
  """
  half_max_code = 0.5 * float(quantizer.num_levels(encoding.bits) - 1)
  codes = packing.unpack_codes(part['codes'], encoding.bits, encoding.num_sent)
  if encoding.sampled:
    centred = tf.cast(codes, tf.float32) - half_max_code
    return _scattered(encoding, centred * (weight * part['threshold'] / half_max_code), coordinates)
  centred = tf.reshape(tf.cast(codes, tf.float32), encoding.shape) - half_max_code
  return centred * (weight * part['threshold'] / half_max_code)


def _padding_is_zero(words: tf.Tensor, encoding: TensorEncoding) -> tf.Tensor:
  used_bits = encoding.num_sent * encoding.bits
  spare_bits = encoding.packed_words * packing.WORD_BITS - used_bits
  if spare_bits == 0:
    return tf.constant(True)
  last_word = tf.cast(tf.bitcast(words[-1], tf.uint32), tf.int64)
  return tf.equal(tf.bitwise.right_shift(last_word, packing.WORD_BITS - spare_bits), 0)


def payload_is_well_formed(
  plan: EncodingPlan, quantized: Sequence[collections.OrderedDict]
) -> tf.Tensor:
  """True when every threshold is finite and >= 0 and no padding bit is set.

  Args:
    plan: the value's `EncodingPlan`.
    quantized: one OrderedDict(codes=int32 words, threshold) per quantized tensor of `plan`,
      in order.

  Returns:
    A scalar bool tensor.
  """
  checks = [tf.constant(True)]
  for encoding, part in zip(plan.quantized, quantized):
    threshold = part['threshold']
    checks.append(tf.reduce_all(tf.math.is_finite(threshold)))
    checks.append(tf.reduce_all(threshold >= 0.0))
    checks.append(_padding_is_zero(part['codes'], encoding))
  return tf.reduce_all(tf.stack(checks))
