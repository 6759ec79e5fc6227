"""Builds the federated learning process of a run: FedAvg with a chosen upload compression.

The process is TFF's own composition (`tff.learning.templates.compose_learning_process`) of
  * a broadcast distributor (TFF's float broadcast, or the quantized one of `broadcast.py`),
  * TFF's FedAvg client work (local training, optionally quantization-aware), followed by a small
    client-side step that turns its result into the run's payload,
  * the model aggregator (float mean, TFF's built-in quantization, or ours),
  * a finalizer applying the server optimizer.

Two payloads:
  * 'update': clients send their model delta (TFF's native FedAvg).
  * 'weights': clients send their trained weights (the paper's setting: the model itself is
    quantized). The server turns the aggregated weights back into a pseudo-gradient
    `current - aggregated` for the server optimizer, so SGD with learning rate 1 sets the model to
    the aggregate.

TFF's client work zeroes a non-finite update and gives it weight 0; every aggregator used here
ignores weight-0 clients (ours rejects and counts them). In 'weights' payload mode, a round whose
aggregate is exactly zero everywhere (no client accepted) gives a zero pseudo-gradient: the model
stays unchanged with plain SGD (with server momentum or Adam, the optimizer's state still moves it,
exactly as in TFF's own FedAvg after a round without valid updates).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq import aggregators
from tff_clipq.learning import broadcast as broadcast_lib
from tff_clipq.learning import models
from tff_clipq.learning import qat as qat_lib
from tff_clipq.learning import weights_payload
from tff_clipq.quantization import packing
from tff_clipq.quantization import bit_allocation
from tff_clipq.quantization import encoding_plan
from tff_clipq.quantization import quantizer

AGGREGATORS = ('float', 'clipq', 'tff_encoded')
PAYLOADS = ('update', 'weights')
OPTIMIZERS = ('sgd', 'adam')
ROTATIONS = ('none', 'hadamard')
# Weightings that a rotation composes with: TFF's MeanFactory weights at the clients and sums.
ROTATION_WEIGHTINGS = ('example_count', 'uniform')


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
  """Which upload compression a run uses.

  Attributes:
    method: 'float' (float32 `tff.aggregators.MeanFactory`, FedAvg), 'clipq' (ours) or
      'tff_encoded' (TFF's built-in min-max stochastic quantization,
      `EncodedSumFactory.quantize_above_threshold`, inside a `MeanFactory`).
    bits: one width, or one per model layer as 'a-b-c-d' (the paper's 4-2-2-4).
    clipping, rounding, weighting, per_channel: as in `clipped_quantization_mean`.
    min_size_to_quantize: smaller tensors (biases) travel in float32, for every method.
    rotation: 'hadamard' rotates each tensor with TFF's `HadamardTransformFactory` (flattened,
      zero-padded to a power of two, random signs) before clipq quantizes it; 'none' does not.
    sample_fraction: clipq sends the codes of a uniformly chosen fraction of each quantized
      tensor's entries (after the rotation, if any), as in `clipped_quantization_mean`; 1 sends
      all of them.
  """

  method: str = 'clipq'
  bits: Union[int, str] = 4
  clipping: Union[str, float] = 'max_abs'
  rounding: str = 'stochastic'
  weighting: str = 'example_count'
  min_size_to_quantize: int = 128
  per_channel: bool = False
  rotation: str = 'none'
  sample_fraction: float = 1.0

  def __post_init__(self):
    if self.method not in AGGREGATORS:
      raise ValueError(f'`method` must be one of {AGGREGATORS}. Found {self.method!r}.')
    object.__setattr__(
      self, 'weighting', aggregators.WEIGHTING_ALIASES.get(self.weighting, self.weighting)
    )
    if self.rotation not in ROTATIONS:
      raise ValueError(f'`rotation` must be one of {ROTATIONS}. Found {self.rotation!r}.')
    if self.rotation != 'none' and self.method != 'clipq':
      raise ValueError(f'`rotation` applies to the clipq aggregator. Found method {self.method!r}.')
    if self.rotation != 'none' and self.weighting not in ROTATION_WEIGHTINGS:
      raise ValueError(
        f"`rotation` composes with weighting {' or '.join(ROTATION_WEIGHTINGS)} (TFF's "
        f'MeanFactory around the rotation weights at the clients). Found {self.weighting!r}.'
      )
    if self.rotation != 'none' and self.per_channel:
      raise ValueError(
        "`per_channel` thresholds need the tensors' channels, which a rotation "
        'mixes: use one or the other.'
      )
    bits = encoding_plan.validate_encoding_settings(
      self.bits, self.min_size_to_quantize, self.clipping, self.rounding
    )
    object.__setattr__(
      self,
      'sample_fraction',
      encoding_plan.validate_sample_fraction(self.sample_fraction, self.per_channel),
    )
    if self.sample_fraction < 1.0 and self.method != 'clipq':
      raise ValueError(
        f'`sample_fraction` applies to the clipq aggregator. Found method {self.method!r}.'
      )
    encoding_plan.validate_budget(bits, self.per_channel, self.sample_fraction)
    if self.method == 'tff_encoded' and not isinstance(bits, int):
      raise ValueError('`bits` per layer or as a budget is only supported by the clipq aggregator.')
    if self.weighting not in aggregators.WEIGHTINGS:
      raise ValueError(
        f'`weighting` must be one of {aggregators.WEIGHTINGS}. Found {self.weighting!r}.'
      )

  @property
  def label(self) -> str:
    """Short name for tables and plots, e.g. 'clipq-4b-octav-stochastic-inverse_error'."""
    if self.method == 'float':
      return 'float32'
    if self.method == 'tff_encoded':
      return f'tff_encoded-{self.bits}b'
    rotated = '-hadamard' if self.rotation != 'none' else ''
    sampled = f'-sample{self.sample_fraction:g}' if self.sample_fraction < 1.0 else ''
    bits = self.bits.replace(':', '') if 'budget' in str(self.bits) else f'{self.bits}b'
    return f'clipq-{bits}-{self.clipping}-{self.rounding}-{self.weighting}{rotated}{sampled}'


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """Everything the learning process depends on (data and loop settings live elsewhere)."""

  model: str = 'cnn'
  input_shape: tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  aggregator: AggregatorConfig = AggregatorConfig()
  payload: str = 'update'
  qat: bool = False
  qat_threshold_refresh_steps: int = 0
  client_optimizer: str = 'sgd'
  client_learning_rate: float = 0.01
  client_momentum: float = 0.9
  server_optimizer: str = 'sgd'
  server_learning_rate: float = 1.0
  server_momentum: float = 0.0
  broadcast: str = 'float'
  broadcast_bits: int = 8
  error_feedback: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.model not in models.MODEL_NAMES:
      raise ValueError(f'`model` must be one of {models.MODEL_NAMES}. Found {self.model!r}.')
    if self.payload not in PAYLOADS:
      raise ValueError(f'`payload` must be one of {PAYLOADS}. Found {self.payload!r}.')
    for name in ('client_optimizer', 'server_optimizer'):
      if getattr(self, name) not in OPTIMIZERS:
        raise ValueError(f'`{name}` must be one of {OPTIMIZERS}. Found {getattr(self, name)!r}.')
    for name in ('client_learning_rate', 'server_learning_rate'):
      if not getattr(self, name) > 0:
        raise ValueError(f'`{name}` must be > 0. Found {getattr(self, name)!r}.')
    for name in ('client_momentum', 'server_momentum'):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f'`{name}` must be in [0, 1). Found {getattr(self, name)!r}.')
    if self.broadcast not in broadcast_lib.BROADCASTS:
      raise ValueError(
        f'`broadcast` must be one of {broadcast_lib.BROADCASTS}. Found {self.broadcast!r}.'
      )
    if (
      isinstance(self.broadcast_bits, bool)
      or not isinstance(self.broadcast_bits, int)
      or not quantizer.MIN_BITS <= self.broadcast_bits <= quantizer.MAX_BITS
    ):
      raise ValueError(
        f'`broadcast_bits` must be an integer in [{quantizer.MIN_BITS}, {quantizer.MAX_BITS}]. '
        f'Found {self.broadcast_bits!r}.'
      )
    if self.uses_qat and self.aggregator.clipping == 'mean_optimal':
      raise ValueError(
        "`qat` trains through the upload's quantizer, but the mean_optimal threshold depends "
        'on the number of clients the server averages, which a client does not know while it '
        'trains: use another `clipping` with `qat`.'
      )
    if self.uses_qat and bit_allocation.is_budget(self.aggregator.bits):
      raise ValueError(
        f'`qat` trains through fixed widths, but `bits`={self.aggregator.bits} lets each client '
        'choose its widths after training: use fixed `bits` with `qat`, or turn `qat` off.'
      )

    if self.error_feedback and (
      self.aggregator.method != 'clipq' or self.aggregator.rotation != 'none'
    ):
      raise ValueError(
        '`error_feedback` keeps what the clipq encoder removed, so it needs the clipq '
        f'aggregator without a rotation. Found method {self.aggregator.method!r}, rotation '
        f'{self.aggregator.rotation!r}.'
      )

  @property
  def uses_qat(self) -> bool:
    return self.qat and self.aggregator.method != 'float'


def _optimizer(
  name: str, learning_rate: float, momentum: float
) -> tff.learning.optimizers.Optimizer:
  if name == 'adam':
    return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
  return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=momentum or None)


def bits_per_tensor(config: ProcessConfig) -> encoding_plan.BitsSpec:
  """The run's bit widths: one int, one per trainable tensor (expanded from per-layer), or the
  budget the clients choose widths within."""
  bits = encoding_plan.parse_bits(config.aggregator.bits)
  if not isinstance(bits, tuple):
    return bits
  keras_model = models.create_keras_model(config.model, config.input_shape, config.num_classes)
  return models.bits_per_tensor(keras_model, bits)


def qat_config(config: ProcessConfig) -> Optional[qat_lib.QatConfig]:
  """The clients' QAT settings: the quantizer their upload goes through.

  Same bits, clipping, rounding and size threshold as the aggregator, so that in the 'weights'
  payload clients train against the quantizer applied to what they send. TFF's min-max quantizer
  does not clip, so its runs train with max_abs clipping.
  """
  if not config.uses_qat:
    return None
  agg = config.aggregator
  return qat_lib.QatConfig(
    bits=bits_per_tensor(config),
    clipping='max_abs' if agg.method == 'tff_encoded' else agg.clipping,
    rounding=agg.rounding,
    min_size_to_quantize=agg.min_size_to_quantize,
    threshold_refresh_steps=config.qat_threshold_refresh_steps,
  )


def build_model_fn(config: ProcessConfig) -> Callable[[], tff.learning.models.VariableModel]:
  return models.build_tff_model_fn(
    config.model, config.input_shape, config.num_classes, config.seed, qat_config(config)
  )


def build_model_aggregator(config: ProcessConfig) -> tff.aggregators.WeightedAggregationFactory:
  """The weighted aggregation factory for the trainable tensors of the model."""
  agg = config.aggregator
  if agg.method == 'float':
    return tff.aggregators.MeanFactory(no_nan_division=True)
  if agg.rotation == 'hadamard':
    # TFF's composition: MeanFactory weights at the clients, the rotation wraps our sum.
    quantized_sum = aggregators.clipped_quantization_sum(
      bits=bits_per_tensor(config),
      clipping=agg.clipping,
      rounding=agg.rounding,
      min_size_to_quantize=agg.min_size_to_quantize,
      seed=config.seed,
      sample_fraction=agg.sample_fraction,
    )
    return tff.aggregators.MeanFactory(
      value_sum_factory=tff.aggregators.HadamardTransformFactory(quantized_sum),
      no_nan_division=True,
    )
  if agg.method == 'tff_encoded':
    # quantize_above_threshold quantizes tensors with more than `threshold` elements.
    encoded = tff.aggregators.EncodedSumFactory.quantize_above_threshold(
      quantization_bits=int(agg.bits), threshold=max(agg.min_size_to_quantize - 1, 0)
    )
    return tff.aggregators.MeanFactory(value_sum_factory=encoded, no_nan_division=True)
  return aggregators.clipped_quantization_mean(
    bits=bits_per_tensor(config),
    clipping=agg.clipping,
    rounding=agg.rounding,
    weighting=agg.weighting,
    min_size_to_quantize=agg.min_size_to_quantize,
    per_channel=agg.per_channel,
    seed=config.seed,
    sample_fraction=agg.sample_fraction,
  )


def upload_bits_per_client(config: ProcessConfig) -> int:
  """Bits one client uploads per round for the model, by the format each method sends.

  For 'clipq' this equals the aggregator's `client_upload_bits` measurement (read from the TFF
  type of its payload). 'float' sends float32 tensors plus its float32 weight; 'tff_encoded'
  sends, per quantized tensor, the bit-packed codes and its float32 min and max, plus the weight.
  """
  keras_model = models.create_keras_model(config.model, config.input_shape, config.num_classes)
  shapes = [tuple(v.shape) for v in keras_model.trainable_variables]
  agg = config.aggregator
  if agg.method == 'float':
    return 32 * sum(int(np.prod(shape)) for shape in shapes) + 32
  if agg.rotation == 'hadamard':  # Each tensor flattened and zero-padded to a power of two.
    shapes = [(1 << max(int(np.prod(shape)) - 1, 0).bit_length(),) for shape in shapes]
  plan = encoding_plan.make_plan(
    shapes,
    bits_per_tensor(config) if agg.method == 'clipq' else int(encoding_plan.parse_bits(agg.bits)),
    agg.min_size_to_quantize,
    agg.clipping,
    agg.rounding,
    agg.per_channel,
    agg.sample_fraction,
  )
  float_bits = 32 * sum(t.num_elements for t in plan.tensors if t.bits is None)
  if agg.method == 'tff_encoded':
    return float_bits + 32 + sum(32 * t.packed_words + 64 for t in plan.quantized)
  thresholds = sum(32 * (t.shape[-1] if agg.per_channel else 1) for t in plan.quantized)
  weighting_bits = {
    'inverse_error': 32 * len(plan.quantized),
    'inverse_normalized_error': 32 * len(plan.quantized),
    'example_count': 32,
    'uniform': 0,
  }[agg.weighting]
  if agg.rotation == 'hadamard':  # MeanFactory sums each client's weight in float32.
    weighting_bits = 32
  accepted_flag_bits = 8
  selection_seed_bits = 32 if plan.sampled else 0  # The int32 the sent coordinates come from.
  if plan.budget is not None:  # One buffer, plus an int32 width per quantized tensor.
    codes = packing.WORD_BITS * plan.budget_words + 32 * len(plan.quantized)
  else:
    codes = sum(packing.WORD_BITS * t.packed_words for t in plan.quantized)
  return codes + thresholds + weighting_bits + accepted_flag_bits + selection_seed_bits + float_bits


def build_distributor(
  config: ProcessConfig, weights_type: tff.types.Type
) -> tff.learning.templates.DistributionProcess:
  """TFF's float broadcast, or the model quantized to `broadcast_bits` (`broadcast.py`).

  Args:
    config: the run's settings (`broadcast`, `broadcast_bits`, `seed`, the upload's
      `min_size_to_quantize`).
    weights_type: the model's `ModelWeights` type.
  """
  if config.broadcast == 'float':
    return tff.learning.templates.build_broadcast_process(weights_type)
  return broadcast_lib.build_quantized_broadcast(
    weights_type,
    config.broadcast_bits,
    config.broadcast,
    min_size_to_quantize=config.aggregator.min_size_to_quantize,
    seed=config.seed,
  )


class Components(NamedTuple):
  """The parts `compose_learning_process` composes (`build_components`)."""

  initial_model_weights_fn: tff.Computation
  distributor: tff.learning.templates.DistributionProcess
  client_work: tff.learning.templates.ClientWorkProcess
  aggregator: tff.templates.AggregationProcess
  finalizer: tff.learning.templates.FinalizerProcess


def build_learning_process(config: ProcessConfig) -> tff.learning.templates.LearningProcess:
  """The run's `tff.learning.templates.LearningProcess` (see the module docstring)."""
  return tff.learning.templates.compose_learning_process(*build_components(config))


def build_components(config: ProcessConfig) -> Components:
  """The run's distributor, client work, aggregator and finalizer, and its initial model."""
  model_fn = build_model_fn(config)
  with tf.Graph().as_default():
    weights_type = tff.learning.models.weights_type_from_model(model_fn)

  @tff.tensorflow.computation
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  client_weighting = (
    tff.learning.ClientWeighting.NUM_EXAMPLES
    if config.aggregator.method != 'clipq' or config.aggregator.weighting == 'example_count'
    else tff.learning.ClientWeighting.UNIFORM
  )
  client_work = tff.learning.templates.build_model_delta_client_work(
    model_fn,
    _optimizer(config.client_optimizer, config.client_learning_rate, config.client_momentum),
    client_weighting=client_weighting,
    # TFF's default, DATASET_REDUCE, runs the training step inside `tf.data`'s reduce function
    # runtime; the iterator loop runs it as an ordinary graph loop and is faster on CPU
    # (benchmarks/round_time.py).
    loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR,
  )
  if config.payload == 'weights':
    client_work = weights_payload.client_work(client_work, weights_type)
  aggregator = build_model_aggregator(config).create(
    weights_type.trainable, tff.TensorType(np.float32)
  )
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
    _optimizer(config.server_optimizer, config.server_learning_rate, config.server_momentum),
    weights_type,
  )
  if config.payload == 'weights':
    finalizer = weights_payload.finalizer(finalizer, weights_type)
  return Components(
    initial_model_weights_fn,
    build_distributor(config, weights_type),
    client_work,
    aggregator,
    finalizer,
  )
