"""Experiment settings: absl flags, and the validated `ExperimentConfig` built from them.

Every setting a study varies is one flag and one field of `ExperimentConfig`, under the same name,
so a message about a bad field names the flag to fix (`--bits`). `flag_definitions.define_flags()`
defines the flags (importing this module defines none); `ExperimentConfig.from_flags()` reads them, and tests and
notebooks build `ExperimentConfig(...)` directly. Construction validates everything before any work
starts and raises `ConfigError`.

A sweep (`--sweep`) is a `;`-separated list of runs, each a `,`-separated list of `flag=value`
overrides of the base flags, e.g. `aggregator=float; aggregator=clipq,bits=2,rounding=nearest`.
Every run uses the same data, clients and seeds unless an override changes them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from typing import Any, Optional, Union

from absl import flags

from tff_clipq import aggregators
from tff_clipq.aggregators.clipped_quantization import settings as quantization_settings
from tff_clipq import data as data_lib
from tff_clipq.learning import models
from tff_clipq.learning import process as process_lib
from tff_clipq.learning import qat as qat_lib
from tff_clipq.quantization import bit_allocation
from tff_clipq.quantization import quantizer

NATURAL_PARTITION = 'natural'
PARTITIONS = data_lib.PARTITIONS + (NATURAL_PARTITION,)
# Fields a sweep may not override: they describe where and how the whole study runs.
STUDY_FIELDS = (
  'output_dir',
  'resume',
  'overwrite',
  'sweep',
  'workers',
  'num_local_workers',
  'worker_intra_op_threads',
)
# Fields that may differ between a run and its resumption: they do not change its results
# (`rounds` may grow to extend a run; `eval_every` only affects rounds not yet run).
RESUMABLE_CHANGES = STUDY_FIELDS + ('data_dir', 'rounds', 'eval_every')


class ConfigError(ValueError):
  """An invalid setting or combination of settings; the message names the flag(s) to fix."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One experiment (or, with `sweep`, a study of several runs); fields are the flags.

  Defaults: 10 rounds of 4-bit clipq FedAvg on MNIST with the paper's CNN, unclipped (max_abs)
  stochastic rounding, FedAvg weights, no QAT (measured best; docs/results.md); see
  `flag_definitions.define_flags` for each field's meaning. `bits` is a width (`4`) or one width per model layer with weights
  (`4-2-2-4`); `clipping` is a method name or a fixed positive threshold (`0.05`).
  """

  # Data.
  dataset: str = 'mnist'
  data_dir: Optional[str] = None
  partition: str = 'iid'
  dirichlet_alpha: float = 0.3
  shards_per_client: int = 2
  size_sigma: float = 0.0
  num_clients: int = 100
  # Training loop.
  clients_per_round: int = 10
  rounds: int = 10
  local_epochs: int = 1
  batch_size: int = 32
  client_optimizer: str = 'sgd'
  client_learning_rate: float = 0.01
  client_momentum: float = 0.9
  server_optimizer: str = 'sgd'
  server_learning_rate: float = 1.0
  server_momentum: float = 0.0
  model: str = 'cnn'
  seed: int = 0
  # Upload compression.
  aggregator: str = 'clipq'
  bits: str = '4'
  clipping: str = 'max_abs'
  rounding: str = 'stochastic'
  weighting: str = 'example_count'
  min_size_to_quantize: int = 128
  per_channel: bool = False
  rotation: str = 'none'
  sample_fraction: float = 1.0
  payload: str = 'update'
  qat: bool = False
  qat_threshold_refresh_steps: int = 0
  error_feedback: bool = False
  # Download compression.
  broadcast: str = 'float'
  broadcast_bits: int = 8
  # Evaluation and outputs.
  eval_every: int = 1
  max_eval_examples: int = 0
  output_dir: str = 'runs/experiment'
  resume: bool = False
  overwrite: bool = False
  sweep: str = ''
  # Execution.
  workers: tuple[str, ...] = ()
  num_local_workers: int = 0
  worker_intra_op_threads: int = 0  # 0: TensorFlow's default (one thread per core).

  def __post_init__(self):
    # Accept `bits=4`, `clipping=0.05` and `workers=[...]` from Python; store the flag forms.
    object.__setattr__(self, 'bits', str(self.bits).strip())
    object.__setattr__(self, 'clipping', str(self.clipping).strip())
    object.__setattr__(self, 'workers', tuple(self.workers))
    _validate(self)

  @classmethod
  def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
    """The config of the parsed flags defined by `flag_definitions.define_flags(flag_values)`."""
    values = {field.name: flag_values[field.name].value for field in dataclasses.fields(cls)}
    values['workers'] = tuple(values['workers'] or ())
    values['data_dir'] = values['data_dir'] or None
    return cls(**values)

  @property
  def aggregator_config(self) -> process_lib.AggregatorConfig:
    return process_lib.AggregatorConfig(
      method=self.aggregator,
      bits=self.bits,
      clipping=_parse_clipping(self.clipping),
      rounding=self.rounding,
      weighting=self.weighting,
      min_size_to_quantize=self.min_size_to_quantize,
      per_channel=self.per_channel,
      rotation=self.rotation,
      sample_fraction=self.sample_fraction,
    )

  def process_config(
    self, input_shape: tuple[int, int, int], num_classes: int
  ) -> process_lib.ProcessConfig:
    """The learning-process settings, for data of `input_shape` with `num_classes` labels.

    Args:
      input_shape: (height, width, channels) of the model's input.
      num_classes: number of labels.
    """
    return process_lib.ProcessConfig(
      model=self.model,
      input_shape=input_shape,
      num_classes=num_classes,
      aggregator=self.aggregator_config,
      payload=self.payload,
      qat=self.qat,
      qat_threshold_refresh_steps=self.qat_threshold_refresh_steps,
      client_optimizer=self.client_optimizer,
      client_learning_rate=self.client_learning_rate,
      client_momentum=self.client_momentum,
      server_optimizer=self.server_optimizer,
      server_learning_rate=self.server_learning_rate,
      server_momentum=self.server_momentum,
      broadcast=self.broadcast,
      broadcast_bits=self.broadcast_bits,
      error_feedback=self.error_feedback,
      seed=self.seed,
    )

  @property
  def data_settings(self) -> tuple[Any, ...]:
    """The fields that determine the federated data; runs sharing them share the data."""
    return (
      self.dataset,
      self.data_dir,
      self.partition,
      self.num_clients,
      self.seed,
      self.dirichlet_alpha,
      self.shards_per_client,
      self.size_sigma,
    )

  def sweep_runs(self) -> list[tuple[str, ExperimentConfig]]:
    """(name, config) of each run: the base with each `sweep` entry's overrides applied.

    Without a sweep, one run named after `output_dir` that writes to `output_dir` itself; with
    one, each run writes to `output_dir/<name>`, the name derived from its overrides.
    """
    if not self.sweep:
      return [(os.path.basename(os.path.normpath(self.output_dir)), self)]
    return [
      (
        name,
        dataclasses.replace(
          self, sweep='', output_dir=os.path.join(self.output_dir, name), **overrides
        ),
      )
      for name, overrides in parse_sweep(self.sweep)
    ]


def _parse_clipping(clipping: str) -> Union[str, float]:
  """'octav' stays a method name; '0.05' becomes a fixed threshold."""
  try:
    return float(clipping)
  except ValueError:
    return clipping


_FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(ExperimentConfig))


def _library_setting(check, *args: Any, **kwargs: Any) -> Any:
  """Runs a library validator; its ValueError/TypeError becomes a ConfigError naming flags.

  The library names its arguments in backticks (`bits`); each that is a flag becomes --bits.
  """
  try:
    return check(*args, **kwargs)
  except (ValueError, TypeError) as error:
    message = re.sub(
      r'`(\w+)`',
      lambda m: f'--{m.group(1)}' if m.group(1) in _FIELD_NAMES else m.group(0),
      str(error),
    )
    raise ConfigError(message) from None


@functools.lru_cache(maxsize=None)
def weighted_layer_names(model: str) -> tuple[str, ...]:
  """Names of the layers of `model` that have trainable weights (one `--bits` entry each)."""
  keras_model = models.create_keras_model(model, models.MNIST_INPUT_SHAPE, 10, seed=0)
  return tuple(layer.name for layer, _ in qat_lib.trainable_variables_by_layer(keras_model))


def _choice(config: ExperimentConfig, name: str, choices: tuple[str, ...]) -> None:
  if getattr(config, name) not in choices:
    raise ConfigError(
      f'--{name} must be one of {", ".join(choices)}. Found {getattr(config, name)!r}.'
    )


def _at_least(config: ExperimentConfig, name: str, minimum: int) -> None:
  value = getattr(config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'--{name} must be an integer >= {minimum}. Found {value!r}.')


def _positive(config: ExperimentConfig, name: str) -> None:
  value = getattr(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ConfigError(f'--{name} must be a number > 0. Found {value!r}.')


def _validate(config: ExperimentConfig) -> None:
  """Raises ConfigError, naming the flag and its allowed values, for the first invalid setting."""
  _choice(config, 'dataset', data_lib.FEDERATED_DATASET_NAMES)
  _choice(config, 'partition', PARTITIONS)
  if (config.dataset == 'emnist') != (config.partition == NATURAL_PARTITION):
    raise ConfigError(
      '--partition=natural (clients are EMNIST writers) goes with --dataset=emnist and only with '
      f'it; other datasets are split with {", ".join(data_lib.PARTITIONS)}. '
      f'Found --dataset={config.dataset} --partition={config.partition}.'
    )
  _positive(config, 'dirichlet_alpha')
  _at_least(config, 'shards_per_client', 1)
  if isinstance(config.size_sigma, bool) or not (
    isinstance(config.size_sigma, (int, float)) and config.size_sigma >= 0
  ):
    raise ConfigError(f'--size_sigma must be a number >= 0. Found {config.size_sigma!r}.')
  _at_least(config, 'num_clients', 1)
  _at_least(config, 'clients_per_round', 1)
  if config.clients_per_round > config.num_clients:
    raise ConfigError(
      f'--clients_per_round must be in [1, --num_clients={config.num_clients}]. '
      f'Found {config.clients_per_round}.'
    )
  for name in ('rounds', 'local_epochs', 'batch_size', 'eval_every'):
    _at_least(config, name, 1)
  _at_least(config, 'max_eval_examples', 0)
  for name in ('client_optimizer', 'server_optimizer'):
    _choice(config, name, process_lib.OPTIMIZERS)
  for name in ('client_learning_rate', 'server_learning_rate'):
    _positive(config, name)
  for name in ('client_momentum', 'server_momentum'):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ConfigError(f'--{name} must be a number in [0, 1). Found {value!r}.')
  _choice(config, 'model', models.MODEL_NAMES)
  _at_least(config, 'seed', 0)

  _choice(config, 'aggregator', process_lib.AGGREGATORS)
  # The quantizer's settings are checked by the library's own validator, once.
  settings = _library_setting(
    quantization_settings.validate_settings,
    config.bits,
    _parse_clipping(config.clipping),
    config.rounding,
    config.weighting,
    aggregators.WEIGHTINGS,
    config.min_size_to_quantize,
    config.per_channel,
    config.seed,
    sample_fraction=config.sample_fraction,
  )
  if config.sample_fraction != 1 and config.aggregator != 'clipq':
    raise ConfigError(
      f'--sample_fraction={config.sample_fraction!r} applies to --aggregator=clipq. '
      f'Found --aggregator={config.aggregator}.'
    )
  if isinstance(settings.bits, tuple):
    layers = weighted_layer_names(config.model)
    if len(settings.bits) != len(layers):
      raise ConfigError(
        f'--bits lists {len(settings.bits)} widths, but --model={config.model} has '
        f'{len(layers)} layers with weights ({", ".join(layers)}): give one width in '
        f'[{quantizer.MIN_BITS}, {quantizer.MAX_BITS}] or {len(layers)} dash-separated ones. '
        f'Found {config.bits!r}.'
      )
    if config.aggregator == 'tff_encoded':
      raise ConfigError(
        f'--bits per layer ({config.bits!r}) needs --aggregator=clipq; tff_encoded takes one width.'
      )
  if bit_allocation.is_budget(settings.bits) and config.aggregator != 'clipq':
    raise ConfigError(
      f'--bits={config.bits} (widths chosen within a budget) needs --aggregator=clipq. '
      f'Found --aggregator={config.aggregator}.'
    )
  _choice(config, 'rotation', process_lib.ROTATIONS)
  _at_least(config, 'qat_threshold_refresh_steps', 0)
  _choice(config, 'payload', process_lib.PAYLOADS)

  if not config.output_dir:
    raise ConfigError('--output_dir must not be empty.')
  if config.resume and config.overwrite:
    raise ConfigError(
      '--resume continues the runs in --output_dir, --overwrite deletes them: pass at most one.'
    )
  _at_least(config, 'num_local_workers', 0)
  if config.workers and config.num_local_workers:
    raise ConfigError(
      'Pass either --workers (remote TFF workers) or --num_local_workers, not both.'
    )
  _at_least(config, 'worker_intra_op_threads', 0)
  if config.workers and config.worker_intra_op_threads:
    raise ConfigError(
      '--worker_intra_op_threads applies to the TFF workers this program starts, not to '
      '--workers started elsewhere (set TF_NUM_INTRAOP_THREADS where those run).'
    )
  for address in config.workers:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(
        f'--workers must be host:port addresses, comma-separated. Found {address!r}.'
      )

  if config.sweep:
    runs = parse_sweep(config.sweep)
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
      raise ConfigError(f'--sweep lists the same run twice: {names}.')
    for name, overrides in runs:
      try:
        dataclasses.replace(config, sweep='', **overrides)
      except ConfigError as e:
        raise ConfigError(f'--sweep run {name!r}: {e}') from None
  # What the learning process checks itself (the broadcast, combinations of settings).
  _library_setting(config.process_config, models.MNIST_INPUT_SHAPE, 10)


def _parse_field_value(name: str, text: str) -> Any:
  """`text` as the type of field `name` (for sweep overrides)."""
  field_type = typing.get_type_hints(ExperimentConfig)[name]
  if field_type is bool:
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'--sweep: {name} must be true or false. Found {text!r}.')
    return text.lower() in ('true', '1')
  if field_type in (int, float):
    try:
      return field_type(text)
    except ValueError:
      raise ConfigError(f'--sweep: {name} must be {field_type.__name__}. Found {text!r}.') from None
  return text


def run_name(overrides: dict[str, str]) -> str:
  """A directory name for a sweep run: 'aggregator=clipq,bits=2' -> 'aggregator-clipq_bits-2'."""
  if not overrides:
    return 'base'
  name = '_'.join(f'{key}-{value}' for key, value in overrides.items())
  return re.sub(r'[^A-Za-z0-9.\-_]', '', name)


def parse_sweep(sweep: str) -> list[tuple[str, dict[str, Any]]]:
  """(run name, {field: typed value}) for each `;`-separated run of `sweep` (see module doc)."""
  allowed = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in STUDY_FIELDS]
  runs = []
  for run_text in sweep.split(';'):
    raw: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in run_text.split(','))):
      key, equals, value = (part.strip() for part in item.partition('='))
      if not equals or not value:
        raise ConfigError(f'--sweep overrides must be flag=value. Found {item!r} in {run_text!r}.')
      if key not in allowed:
        raise ConfigError(
          f'--sweep cannot set {key!r}; it can set: {", ".join(allowed)}. Found in {run_text!r}.'
        )
      if key in raw:
        raise ConfigError(f'--sweep run {run_text.strip()!r} sets {key} twice.')
      raw[key] = value
    if raw or run_text.strip():
      runs.append((run_name(raw), {k: _parse_field_value(k, v) for k, v in raw.items()}))
  if not runs:
    raise ConfigError(f'--sweep lists no run. Found {sweep!r}.')
  return runs
