"""The variants `round_time.py` times: their names, what each runs, and the TFF ones' processes.

A variant's name decides everything about it (`variant_spec`): its group in the report ('a' the
plain-TF compute floor, 'b' TFF FedAvg, 'c' TFF's own compression, 'd' ours), the aggregator
method, bits and QAT settings. `Workload` holds what every variant shares (data shape, batch
size, epochs, payload, seed); `process_config` turns both into the library's `ProcessConfig`, so
the TFF variants are built by `tff_clipq.learning.process` exactly as the experiments build them.
The floor itself lives in `round_time_floor.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.learning import process as process_lib

ALL_VARIANTS = (
  'keras',
  'keras_qat_2b',
  'keras_qat_4b',
  'keras_qat_2b_every_step',
  'fedavg_float',
  'tff_encoded_2b',
  'tff_encoded_4b',
  'tff_compression_aggregator',
  'clipq_2b',
  'clipq_4b',
  'clipq_2b_qat',
  'clipq_4b_qat',
  'clipq_2b_qat_every_step',
)
EVERY_STEP = '_every_step'
FLOOR = 'keras'
FEDAVG = 'fedavg_float'


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  name: str
  group: str  # 'a', 'b', 'c' or 'd', as in the docstring of `round_time.py`.
  description: str
  method: Optional[str] = None  # AggregatorConfig.method for TFF variants; None for the floor.
  bits: int = 4
  qat: bool = False
  qat_refresh_steps: int = 0  # QatConfig.threshold_refresh_steps.


def variant_spec(name: str) -> VariantSpec:
  """The variant `name`; a `_every_step` suffix makes QAT recompute thresholds at every step."""
  every_step = name.endswith(EVERY_STEP) and '_qat' in name
  base = name[: -len(EVERY_STEP)] if every_step else name
  refresh = dict(qat_refresh_steps=1) if every_step else {}
  refresh_note = ', thresholds every step' if every_step else ''
  if name == 'keras':
    return VariantSpec(name, 'a', 'plain TF local training (compute floor)')
  if base.startswith('keras_qat_'):
    bits = int(base[len('keras_qat_') : -1])
    return VariantSpec(
      name,
      'a',
      f'plain TF local training, QAT {bits}-bit{refresh_note}',
      bits=bits,
      qat=True,
      **refresh,
    )
  if name == 'fedavg_float':
    return VariantSpec(name, 'b', 'TFF FedAvg, MeanFactory float32', method='float')
  if name.startswith('tff_encoded_'):
    bits = int(name[len('tff_encoded_') : -1])
    return VariantSpec(
      name,
      'c',
      f'TFF EncodedSumFactory.quantize_above_threshold {bits}-bit',
      method='tff_encoded',
      bits=bits,
    )
  if name == 'tff_compression_aggregator':
    return VariantSpec(
      name,
      'c',
      'tff.learning.compression_aggregator() (8-bit, zeroing, clipping)',
      method='tff_compression',
    )
  if base.startswith('clipq_'):
    qat = base.endswith('_qat')
    bits = int(base[len('clipq_') :].split('b')[0])
    return VariantSpec(
      name,
      'd',
      f'ours {bits}-bit' + (' + QAT' if qat else '') + refresh_note,
      method='clipq',
      bits=bits,
      qat=qat,
      **refresh,
    )
  raise ValueError(f'Unknown variant {name!r}; expected one of {ALL_VARIANTS}.')


@dataclasses.dataclass(frozen=True)
class Workload:
  input_shape: tuple[int, int, int]
  num_classes: int
  batch_size: int
  local_epochs: int
  payload: str
  seed: int


def process_config(spec: VariantSpec, workload: Workload) -> process_lib.ProcessConfig:
  """The `ProcessConfig` of a variant (for the floor and 'tff_compression': the model part).

  Args:
    spec: the variant.
    workload: what all variants share.
  """
  method = spec.method if spec.method in process_lib.AGGREGATORS else 'float'
  return process_lib.ProcessConfig(
    model='cnn',
    input_shape=workload.input_shape,
    num_classes=workload.num_classes,
    aggregator=process_lib.AggregatorConfig(method=method, bits=spec.bits),
    payload=workload.payload,
    qat=spec.qat,
    qat_threshold_refresh_steps=spec.qat_refresh_steps,
    seed=workload.seed,
  )


class TffVariant:
  """A TFF learning process and its state; `run_round` is one `process.next`.

  Args:
    spec: the variant (a TFF one: `spec.method` is set).
    workload: what all variants share.
  """

  def __init__(self, spec: VariantSpec, workload: Workload):
    config = process_config(spec, workload)
    if spec.method == 'tff_compression':
      self.process = tff.learning.algorithms.build_weighted_fed_avg(
        process_lib.build_model_fn(config),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(
          learning_rate=config.client_learning_rate, momentum=config.client_momentum
        ),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(
          learning_rate=config.server_learning_rate
        ),
        model_aggregator=tff.learning.compression_aggregator(),
      )
    else:
      self.process = process_lib.build_learning_process(config)
    self.state = self.process.initialize()

  def run_round(self, datasets: list[tf.data.Dataset]) -> None:
    self.state = self.process.next(self.state, datasets).state
