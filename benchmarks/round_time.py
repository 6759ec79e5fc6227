r"""Round time: plain-TF compute floor vs TFF FedAvg vs TFF's compression vs ours, with scaling.

In one run, for each number of clients per round K (`--clients_per_round`), this measures the wall
time of one federated round of every variant below, the median over `--rounds` timed rounds after
one warm-up round (which absorbs tracing and compilation), and the peak memory during the timed
rounds:

  (a) `keras`: the compute floor. The same clients' data trained in plain TensorFlow, clients one
      after another: a `tf.function` loop over each client's dataset with the paper's CNN, SGD
      lr 0.01 momentum 0.9 (TFF's `build_sgdm` update), weights and momentum reset per client,
      followed by the example-weighted mean of the model deltas applied to the global model.
      `keras_qat_{2,4}b`: the same loop with the QAT model (`tff_clipq.learning.qat`), its
      thresholds recomputed once per client (the default, as TFF resets QAT's counters every
      client round: the floor resets them per client too); `keras_qat_2b_every_step`
      recomputes them at every step.
  (b) `fedavg_float`: TFF FedAvg with `tff.aggregators.MeanFactory` (method 'float').
  (c) `tff_minmax_{2,4}b`: TFF's built-in quantization, `EncodedSumFactory.quantize_above_threshold`
      in a `MeanFactory` (method 'tff_encoded'); `tff_compression_aggregator`:
      `tff.learning.compression_aggregator()` (8 bits above 20,000 elements, adaptive zeroing and
      L2 clipping) in `tff.learning.algorithms.build_weighted_fed_avg`.
  (d) `clipq_{2,4}b`: ours (method 'clipq': OCTAV thresholds, stochastic rounding, inverse-error
      weighting), without QAT; `clipq_{2,4}b_qat`: the same with quantization-aware training
      (thresholds once per client round); `clipq_2b_qat_every_step`: QAT recomputing them at
      every step.

All TFF variants send model updates (`--payload`), quantize tensors of >= 128 elements (biases
travel in float32) and get the same client datasets: in round r of scale K the same K clients
(sampled with `--seed`, K and r), each `preprocess_for_training(dataset, --batch_size,
--local_epochs, seed)`. A round's time runs from building the clients' `tf.data` pipelines to the
end of `process.next` (for the floor: to the end of the local training and averaging); the
pipeline-building part is also reported alone (`data_s`).

To keep background load from favouring one variant, the timed rounds are interleaved: round r
runs every variant once, in an order rotated by r. Ratios are to the floor (a) and to FedAvg (b)
of the same K; compare ratios, not seconds, across runs (the machine is shared).

Also per round: the CPU seconds (user + system) of this process and the worker, which other jobs
on a shared machine disturb less than wall time. TFF runs a round's clients concurrently while
the floor trains them one after another, so TFF can beat the floor in wall time.

Memory: the peak resident set size (Linux `VmHWM`, reset before every timed round through
`/proc/<pid>/clear_refs`) of this process and of the TFF `worker_binary` child (a fresh worker per
K), the maximum over a variant's timed rounds, and the rise over the RSS before the round. Where
the reset is refused, a 20 ms RSS sampler stands in. The linear-growth check uses the worker's
peak and this process's per-round rise: this process keeps ~80 KB per client dataset ever built
(reported), so its peak reflects the run's history, not K.

Targets (met / not met on wall-time medians, CPU ratios shown beside): ours without QAT within 5%
of FedAvg; QAT adding <= 25% of local training ((with QAT - without) / floor, and keras_qat /
keras - 1); a TFF round within 1.5x of the floor; memory at most linear in K.

TFF's worker runs a round's clients concurrently and by default lets every TensorFlow operation
use all cores as well; `--worker_intra_op_threads=1` limits each operation to one thread (see
`tff_clipq.runtime`), which the results record.

Defaults (chosen so the whole run takes ~15-20 minutes on 2 shared cores): MNIST (60k train) split
IID into 600 clients of 100 examples, batch size 20, 1 local epoch (5 steps per client), K = 10,
50, 100, 3 timed rounds.

Usage:
  python benchmarks/round_time.py [--clients_per_round=10,50,100] [--rounds=3] \
      [--output=benchmarks/results/round_time.md] [--variants=keras,fedavg_float,clipq_4b] \
      [--baseline=previous_run.json] [--worker_intra_op_threads=1]

Results: markdown table and JSON (same stem) written atomically (temporary file, `os.replace`);
with `--baseline`, a before/after table against an earlier run's JSON is added.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TensorFlow is imported.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # Run as a script from anywhere, without installing the package.
  sys.path.insert(0, _REPO_ROOT)

from benchmarks import bench_util  # pylint: disable=g-import-not-at-top
from tff_clipq import data as data_lib  # pylint: disable=g-import-not-at-top
from tff_clipq import runtime
from tff_clipq.experiments import outputs
from tff_clipq.learning import models
from tff_clipq.learning import process as process_lib
from tff_clipq.learning import qat as qat_lib

ALL_VARIANTS = (
  'keras',
  'keras_qat_2b',
  'keras_qat_4b',
  'keras_qat_2b_every_step',
  'fedavg_float',
  'tff_minmax_2b',
  'tff_minmax_4b',
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

# Flags go to absl's global FLAGS only when run as a script, so that tests can import this module
# beside other benchmarks that define flags of the same names.
_FLAG_VALUES = flags.FLAGS if __name__ == '__main__' else flags.FlagValues()

_OUTPUT = flags.DEFINE_string(
  'output',
  os.path.join(_REPO_ROOT, 'benchmarks', 'results', 'round_time.md'),
  'Markdown report path; a .json with the same stem is written beside it.',
  flag_values=_FLAG_VALUES,
)
_CLIENTS_PER_ROUND = flags.DEFINE_list(
  'clients_per_round',
  ['10', '50', '100'],
  'Numbers of clients per round to measure.',
  flag_values=_FLAG_VALUES,
)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 3, 'Timed rounds per variant and scale.', lower_bound=1, flag_values=_FLAG_VALUES
)
_VARIANTS = flags.DEFINE_list(
  'variants',
  list(ALL_VARIANTS),
  f'Variants to run, among {ALL_VARIANTS}.',
  flag_values=_FLAG_VALUES,
)
_DATASET = flags.DEFINE_string(
  'dataset', 'mnist', 'mnist, fashion_mnist, digits or synthetic.', flag_values=_FLAG_VALUES
)
_NUM_CLIENTS = flags.DEFINE_integer(
  'num_clients',
  600,
  'Clients the training set is split into (IID).',
  lower_bound=1,
  flag_values=_FLAG_VALUES,
)
_EXAMPLES_PER_CLIENT = flags.DEFINE_integer(
  'examples_per_client',
  0,
  'If > 0, each client uses only its first this many examples.',
  lower_bound=0,
  flag_values=_FLAG_VALUES,
)
_BATCH_SIZE = flags.DEFINE_integer(
  'batch_size', 20, 'Client batch size.', lower_bound=1, flag_values=_FLAG_VALUES
)
_LOCAL_EPOCHS = flags.DEFINE_integer(
  'local_epochs', 1, 'Client epochs per round.', lower_bound=1, flag_values=_FLAG_VALUES
)
_PAYLOAD = flags.DEFINE_enum(
  'payload', 'update', process_lib.PAYLOADS, 'What clients send.', flag_values=_FLAG_VALUES
)
_SEED = flags.DEFINE_integer(
  'seed', 0, 'Seed for the split, client sampling and the model.', flag_values=_FLAG_VALUES
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir',
  None,
  'Data directory (default: $TFF_CLIPQ_MNIST_DIR, else /work/shared/data/mnist for mnist, '
  'else the usual places).',
  flag_values=_FLAG_VALUES,
)
_BASELINE = flags.DEFINE_string(
  'baseline',
  None,
  'JSON of an earlier run of this benchmark: adds a before/after table.',
  flag_values=_FLAG_VALUES,
)
_RETARGET = flags.DEFINE_string(
  'retarget',
  None,
  'JSON of an earlier run: re-evaluate its targets with this version of the benchmark and '
  'rewrite its markdown and JSON (to --output) without measuring anything.',
  flag_values=_FLAG_VALUES,
)
_WORKER_INTRA_OP_THREADS = flags.DEFINE_integer(
  'worker_intra_op_threads',
  0,
  "Threads one TensorFlow operation may use in the TFF worker (0: TensorFlow's default, one "
  'per core); see `tff_clipq.runtime`.',
  lower_bound=0,
  flag_values=_FLAG_VALUES,
)
_CHANGES = flags.DEFINE_string(
  'changes',
  None,
  'Markdown file describing the changes since --baseline (copied verbatim).',
  flag_values=_FLAG_VALUES,
)

_MB = 1024.0 * 1024.0
_SHARED_MNIST_DIR = (
  '/work/shared/data/mnist'  # Used for mnist when neither flag nor env var is set.
)


# ---------------------------------------------------------------------------------------------
# Memory.


def _read_status_kb(pid: int, key: str) -> Optional[int]:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(key + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _rss_bytes(pid: int) -> Optional[int]:
  kb = _read_status_kb(pid, 'VmRSS')
  return None if kb is None else kb * 1024


class PeakMemory:
  """Peak RSS of a set of processes over an interval: `VmHWM` after a reset, else sampling."""

  def __init__(self, pids: dict[str, int]):
    self._pids = {name: pid for name, pid in pids.items() if pid is not None}
    self._resettable = all(self._reset(pid) for pid in self._pids.values())
    self._peaks: dict[str, int] = {}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  @staticmethod
  def _reset(pid: int) -> bool:
    try:
      with open(f'/proc/{pid}/clear_refs', 'w') as f:
        f.write('5')  # Resets VmHWM to the current RSS (Linux >= 4.0).
      return True
    except OSError:
      return False

  @property
  def method(self) -> str:
    return 'VmHWM (reset per round)' if self._resettable else 'RSS sampled every 20 ms'

  def __enter__(self) -> PeakMemory:
    self._peaks = {name: _rss_bytes(pid) or 0 for name, pid in self._pids.items()}
    self._starts = dict(self._peaks)
    if self._resettable:
      for pid in self._pids.values():
        self._reset(pid)
    else:
      self._stop.clear()
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def _sample(self) -> None:
    while not self._stop.wait(0.02):
      for name, pid in self._pids.items():
        self._peaks[name] = max(self._peaks[name], _rss_bytes(pid) or 0)

  def __exit__(self, *exc_info) -> None:
    if self._resettable:
      for name, pid in self._pids.items():
        kb = _read_status_kb(pid, 'VmHWM')
        self._peaks[name] = max(self._peaks[name], (kb or 0) * 1024)
    else:
      self._stop.set()
      self._thread.join()

  @property
  def peaks(self) -> dict[str, int]:
    return dict(self._peaks)

  @property
  def rises(self) -> dict[str, int]:
    return {name: max(peak - self._starts[name], 0) for name, peak in self._peaks.items()}


def _worker_pid() -> Optional[int]:
  pids = runtime.live_worker_pids()
  return pids[-1] if pids else None


# ---------------------------------------------------------------------------------------------
# Variants.


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  name: str
  group: str  # 'a', 'b', 'c' or 'd', as in the module docstring.
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
  if name.startswith('tff_minmax_'):
    bits = int(name[len('tff_minmax_') : -1])
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
  """The `ProcessConfig` of a TFF variant (for 'tff_compression' only the model part is used)."""
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
  """A TFF learning process and its state; `run_round` is one `process.next`."""

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


class KerasFloor:
  """FedAvg rounds in plain TF: sequential local training, then the weighted mean of deltas.

  `train_client` is one `tf.function`, traced once per dataset element spec: it resets the model
  to the global weights and the momentum to zero, runs SGD with momentum (TFF's `build_sgdm`:
  v <- m v + g, w <- w - lr v) over the dataset and returns the model delta and the example count.
  """

  def __init__(self, spec: VariantSpec, workload: Workload):
    config = process_config(spec, workload)
    model = models.create_keras_model(
      'cnn', workload.input_shape, workload.num_classes, workload.seed
    )
    qat_config = (
      process_lib.qat_config(
        dataclasses.replace(
          config, aggregator=dataclasses.replace(config.aggregator, method='clipq')
        )
      )
      if spec.qat
      else None
    )
    self.model = qat_lib.apply_qat(model, qat_config) if qat_config else model
    variables = self.model.trainable_variables
    self.global_weights = [tf.Variable(v) for v in variables]
    # QAT's cached thresholds and pass counters: reset per client, as TFF loads them per round.
    self.initial_non_trainable = [tf.Variable(v) for v in self.model.non_trainable_variables]
    self.velocities = [tf.Variable(tf.zeros_like(v)) for v in variables]
    self.delta_sums = [tf.Variable(tf.zeros_like(v)) for v in variables]
    self.example_sum = tf.Variable(0.0)
    self.learning_rate = config.client_learning_rate
    self.momentum = config.client_momentum
    self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function
  def train_client(self, dataset: tf.data.Dataset) -> None:
    variables = self.model.trainable_variables
    for variable, start in zip(variables, self.global_weights):
      variable.assign(start)
    for variable, start in zip(self.model.non_trainable_variables, self.initial_non_trainable):
      variable.assign(start)
    for velocity in self.velocities:
      velocity.assign(tf.zeros_like(velocity))
    examples = tf.constant(0.0)
    # `iter`: AutoGraph turns `for batch in dataset` into `dataset.reduce`, whose body runs in
    # tf.data's function runtime, ~2.8x slower here; the iterator loop is TFF's DATASET_ITERATOR.
    for batch in iter(dataset):
      with tf.GradientTape() as tape:
        logits = self.model(batch['x'], training=True)
        loss = self.loss_fn(batch['y'], logits)
      gradients = tape.gradient(loss, variables)
      for variable, velocity, gradient in zip(variables, self.velocities, gradients):
        velocity.assign(self.momentum * velocity + gradient)
        variable.assign_sub(self.learning_rate * velocity)
      examples += tf.cast(tf.shape(batch['y'])[0], tf.float32)
    for total, variable, start in zip(self.delta_sums, variables, self.global_weights):
      total.assign_add(examples * (variable - start))
    self.example_sum.assign_add(examples)

  @tf.function
  def apply_mean(self) -> None:
    for weights, total in zip(self.global_weights, self.delta_sums):
      weights.assign_add(tf.math.divide_no_nan(total, self.example_sum))
      total.assign(tf.zeros_like(total))
    self.example_sum.assign(0.0)

  def run_round(self, datasets: list[tf.data.Dataset]) -> None:
    for dataset in datasets:
      self.train_client(dataset)
    self.apply_mean()
    self.global_weights[0].numpy()  # Block until done.


def build_variant(spec: VariantSpec, workload: Workload):
  return KerasFloor(spec, workload) if spec.method is None else TffVariant(spec, workload)


# ---------------------------------------------------------------------------------------------
# Data.


class RoundData:
  """Builds the clients' training pipelines of round r at scale K (same for every variant)."""

  def __init__(
    self, federated: data_lib.FederatedData, workload: Workload, examples_per_client: int
  ):
    self._train = federated.train
    self._client_ids = list(federated.train.client_ids)
    self._workload = workload
    self._examples_per_client = examples_per_client
    self.datasets_built = 0

  def client_ids(self, clients_per_round: int, round_index: int) -> list[str]:
    if clients_per_round > len(self._client_ids):
      raise ValueError(
        f'{clients_per_round} clients per round, but the data has {len(self._client_ids)} clients.'
      )
    rng = np.random.default_rng([self._workload.seed, clients_per_round, round_index + 1])
    return sorted(rng.choice(self._client_ids, clients_per_round, replace=False).tolist())

  def datasets(self, client_ids: list[str]) -> list[tf.data.Dataset]:
    result = []
    for client_id in client_ids:
      dataset = self._train.create_tf_dataset_for_client(client_id)
      if self._examples_per_client:
        dataset = dataset.take(self._examples_per_client)
      result.append(
        data_lib.preprocess_for_training(
          dataset, self._workload.batch_size, self._workload.local_epochs, self._workload.seed
        )
      )
    self.datasets_built += len(result)
    return result


# ---------------------------------------------------------------------------------------------
# Measurement.


@dataclasses.dataclass
class Measurement:
  variant: str
  clients_per_round: int
  round_s: list[float] = dataclasses.field(default_factory=list)
  data_s: list[float] = dataclasses.field(default_factory=list)
  warmup_s: Optional[float] = None
  peak_main_bytes: int = 0
  peak_worker_bytes: int = 0
  # Largest rise of RSS during one timed round over the RSS just before it (what the round itself
  # allocates, beyond what the process already held).
  rise_main_bytes: int = 0
  rise_worker_bytes: int = 0
  # CPU seconds (user + system) per timed round of this process plus the worker: less sensitive
  # than wall time to other jobs on a shared machine.
  cpu_s: list[float] = dataclasses.field(default_factory=list)

  @property
  def median_s(self) -> float:
    return statistics.median(self.round_s)


def timed_round(variant, round_data: RoundData, client_ids: list[str]) -> tuple[float, float]:
  start = time.perf_counter()
  datasets = round_data.datasets(client_ids)
  built = time.perf_counter()
  variant.run_round(datasets)
  end = time.perf_counter()
  return end - start, built - start


def _worker_threads_line(intra_op_threads: int) -> str:
  return (
    f'- TFF worker: {bench_util.describe_intra_op_threads(intra_op_threads)} '
    f'(`--worker_intra_op_threads={intra_op_threads}`); the floor (a) runs in this process '
    "with TensorFlow's default."
  )


def run_benchmark(
  variant_names: list[str],
  scales: list[int],
  rounds: int,
  round_data: RoundData,
  workload: Workload,
  log: Callable[[str], None] = print,
  worker_intra_op_threads: Optional[int] = None,
) -> tuple[dict[str, float], list[Measurement], str, dict[str, float]]:
  """Builds every variant, then measures each scale (TFF's worker with `worker_intra_op_threads`).

  Returns:
    (build_s, measurements, memory method, main-process growth): the last gives this process's
    RSS after the first scale (warm-ups done) and at the end, and the client datasets built in
    between.
  """
  variants, build_s = {}, {}
  # TFF variants first: TFF builds Keras models inside graphs, which invalidates Keras models
  # made earlier outside them (Keras' v1 layer check), so the plain-TF floors come last.
  for name in sorted(variant_names, key=lambda n: variant_spec(n).method is None):
    start = time.perf_counter()
    variants[name] = build_variant(variant_spec(name), workload)
    build_s[name] = time.perf_counter() - start
    log(f'built {name} in {build_s[name]:.1f} s')
  rss_after_first_scale, datasets_before = None, 0

  measurements = []
  memory_method = ''
  for clients_per_round in scales:
    # A fresh worker_binary per scale: its memory at scale K then holds nothing from other scales.
    runtime.set_local_execution_context(intra_op_threads=worker_intra_op_threads)
    by_name = {name: Measurement(name, clients_per_round) for name in variant_names}
    warmup_ids = round_data.client_ids(clients_per_round, -1)
    for name in variant_names:
      by_name[name].warmup_s, _ = timed_round(variants[name], round_data, warmup_ids)
      log(f'K={clients_per_round} warm-up {name}: {by_name[name].warmup_s:.2f} s')
    for round_index in range(rounds):
      client_ids = round_data.client_ids(clients_per_round, round_index)
      shift = round_index % len(variant_names)
      for name in variant_names[shift:] + variant_names[:shift]:
        worker_pid = _worker_pid()
        cpu_start = bench_util.cpu_seconds_with_workers()
        with PeakMemory({'main': os.getpid(), 'worker': worker_pid}) as memory:
          seconds, data_seconds = timed_round(variants[name], round_data, client_ids)
        cpu = bench_util.cpu_seconds_with_workers() - cpu_start
        memory_method = memory.method
        m = by_name[name]
        m.round_s.append(seconds)
        m.cpu_s.append(cpu)
        m.data_s.append(data_seconds)
        m.peak_main_bytes = max(m.peak_main_bytes, memory.peaks.get('main', 0))
        m.rise_main_bytes = max(m.rise_main_bytes, memory.rises.get('main', 0))
        if variant_spec(name).method is not None:  # The floor runs without the worker.
          m.peak_worker_bytes = max(m.peak_worker_bytes, memory.peaks.get('worker', 0))
          m.rise_worker_bytes = max(m.rise_worker_bytes, memory.rises.get('worker', 0))
        log(f'K={clients_per_round} round {round_index} {name}: {seconds:.2f} s, CPU {cpu:.2f} s')
    measurements.extend(by_name.values())
    if rss_after_first_scale is None:  # After the first scale, warm-up allocations are done.
      rss_after_first_scale = _rss_bytes(os.getpid()) or 0
      datasets_before = round_data.datasets_built
  growth = collections.OrderedDict(
    main_rss_after_first_scale_mb=(rss_after_first_scale or 0) / _MB,
    main_rss_end_mb=(_rss_bytes(os.getpid()) or 0) / _MB,
    client_datasets_built=round_data.datasets_built - datasets_before,
  )
  return build_s, measurements, memory_method, growth


# ---------------------------------------------------------------------------------------------
# Targets and report.


def _lookup(measurements: list[Measurement]) -> dict[tuple[str, int], Measurement]:
  return {(m.variant, m.clients_per_round): m for m in measurements}


def ratio(measurements, variant: str, reference: str, clients_per_round: int) -> Optional[float]:
  table = _lookup(measurements)
  a, b = table.get((variant, clients_per_round)), table.get((reference, clients_per_round))
  if a is None or b is None:
    return None
  return a.median_s / b.median_s


def cpu_ratio(
  measurements, variant: str, reference: str, clients_per_round: int
) -> Optional[float]:
  table = _lookup(measurements)
  a, b = table.get((variant, clients_per_round)), table.get((reference, clients_per_round))
  if a is None or b is None or not statistics.median(b.cpu_s):
    return None
  return statistics.median(a.cpu_s) / statistics.median(b.cpu_s)


def _memory_is_at_most_linear(
  points: list[tuple[int, float]], slack_mb: float = 32.0
) -> Optional[bool]:
  """True unless the memory added per client grows from the first interval to the last.

  points: (clients per round, peak MB), sorted by clients. A superlinear curve has a larger
  slope on the last interval than on the first; `slack_mb` and 25% absorb measurement noise.
  """
  if len(points) < 3:
    return None
  (k0, m0), (k1, m1), (k2, m2) = points[0], points[-2], points[-1]
  first_slope = max((m1 - m0) / (k1 - k0), 0.0)
  last_slope = (m2 - m1) / (k2 - k1)
  return last_slope * (k2 - k1) <= 1.25 * first_slope * (k2 - k1) + slack_mb


def _rise_is_at_most_linear(
  points: list[tuple[int, float]], slack_mb: float = 32.0
) -> Optional[bool]:
  """True unless the memory a round adds per client at the largest K exceeds the smaller K's.

  points: (clients per round, MB a round adds), sorted by clients. A round's rise is small and
  noisy (allocator, garbage collection), so comparing slopes between neighbouring K would judge
  noise; this checks rise(K_max) <= 1.25 K_max max_k(rise(k) / k) + `slack_mb` over smaller k.
  """
  if len(points) < 2:
    return None
  *smaller, (k_max, rise_max) = points
  per_client = max(max(rise, 0.0) / k for k, rise in smaller)
  return rise_max <= 1.25 * k_max * per_client + slack_mb


def evaluate_targets(measurements: list[Measurement], scales: list[int]) -> list[dict[str, Any]]:
  """The issue's four targets, each met / not met / not measured, with the numbers."""
  names = {m.variant for m in measurements}
  table = _lookup(measurements)
  targets = []

  def add(name, limit, values, met=None, cpu_values=None):
    """`values` (wall time) decide met / not met; `cpu_values` are shown beside them."""
    values = {k: v for k, v in values.items() if v is not None}
    if met is None:
      met = all(v <= limit for v in values.values()) if values else None
    cpu_values = {k: v for k, v in (cpu_values or {}).items() if v is not None}
    targets.append(
      collections.OrderedDict(
        target=name, limit=limit, values=values, cpu_values=cpu_values, met=met
      )
    )

  add(
    'aggregator overhead: clipq (no QAT) round / FedAvg round <= 1.05',
    1.05,
    {
      f'{v} K={k}': ratio(measurements, v, FEDAVG, k)
      for v in ('clipq_2b', 'clipq_4b')
      if v in names
      for k in scales
    },
    cpu_values={
      f'{v} K={k}': cpu_ratio(measurements, v, FEDAVG, k)
      for v in ('clipq_2b', 'clipq_4b')
      if v in names
      for k in scales
    },
  )
  qat_values, qat_cpu_values = {}, {}
  cpu = lambda m: statistics.median(m.cpu_s)
  for bits in (2, 4):
    for k in scales:
      with_qat, without = table.get((f'clipq_{bits}b_qat', k)), table.get((f'clipq_{bits}b', k))
      floor = table.get((FLOOR, k))
      if with_qat and without and floor:
        # Time QAT adds to a round, relative to the time of local training itself (the floor).
        key = f'clipq_{bits}b: (qat - no qat) / floor, K={k}'
        qat_values[key] = (with_qat.median_s - without.median_s) / floor.median_s
        if cpu(floor):
          qat_cpu_values[key] = (cpu(with_qat) - cpu(without)) / cpu(floor)
      keras_qat = table.get((f'keras_qat_{bits}b', k))
      if keras_qat and floor:
        key = f'keras_qat_{bits}b / keras - 1, K={k}'
        qat_values[key] = keras_qat.median_s / floor.median_s - 1
        if cpu(floor):
          qat_cpu_values[key] = cpu(keras_qat) / cpu(floor) - 1
  add('QAT overhead on local training <= 25%', 0.25, qat_values, cpu_values=qat_cpu_values)
  add(
    'whole round / compute floor <= 1.5',
    1.5,
    {
      f'{v} K={k}': ratio(measurements, v, FLOOR, k)
      for v in (FEDAVG, 'clipq_2b', 'clipq_4b')
      if v in names
      for k in scales
    },
    cpu_values={
      f'{v} K={k}': cpu_ratio(measurements, v, FLOOR, k)
      for v in (FEDAVG, 'clipq_2b', 'clipq_4b')
      if v in names
      for k in scales
    },
  )
  # The worker starts afresh at every K, so its peak at K is what rounds of K clients need. This
  # process lives through the whole run and keeps what earlier rounds left (see the note on
  # dataset memory), so for it the rise during a round is used, per client (it is small and
  # noisy: see `_rise_is_at_most_linear`).
  memory_values, memory_met = {}, []
  for variant in sorted(names):
    for label, attribute in (
      ('worker peak', 'peak_worker_bytes'),
      ('main round rise', 'rise_main_bytes'),
    ):
      if variant_spec(variant).method is None and label == 'worker peak':
        continue
      points = [
        (k, getattr(table[(variant, k)], attribute) / _MB)
        for k in sorted(scales)
        if (variant, k) in table
      ]
      check = _memory_is_at_most_linear if label == 'worker peak' else _rise_is_at_most_linear
      linear = check(points)
      if linear is not None:
        memory_values[f'{variant} {label}'] = ' -> '.join(f'{mb:.0f}' for _, mb in points)
        if variant_spec(variant).group == 'd':  # The target is about ours; others are context.
          memory_met.append(linear)
        if not linear:
          memory_values[f'{variant} {label}'] += ' (superlinear)'
  add(
    'memory grows at most linearly with clients per round (MB at each K; judged on ours, clipq_*)',
    None,
    memory_values,
    met=all(memory_met) if memory_met else None,
  )
  return targets


def _fmt(value: Optional[float], digits: int = 2) -> str:
  return '—' if value is None else f'{value:.{digits}f}'


def _met(met: Optional[bool]) -> str:
  return {True: 'met', False: '**not met**', None: 'not measured'}[met]


def _growth_lines(growth: Optional[dict[str, float]]) -> list[str]:
  if not growth or not growth.get('client_datasets_built'):
    return []
  grown = growth['main_rss_end_mb'] - growth['main_rss_after_first_scale_mb']
  per_dataset_kb = 1024.0 * grown / growth['client_datasets_built']
  return [
    f"- This process's RSS grew from {growth['main_rss_after_first_scale_mb']:.0f} MB (after the "
    f'first K) to {growth["main_rss_end_mb"]:.0f} MB while {growth["client_datasets_built"]} client '
    f'datasets were built (~{per_dataset_kb:.0f} KB per dataset; an upper bound, anything else '
    'kept counts too): each '
    '`create_tf_dataset_for_client` + `preprocess_for_training` call leaves memory behind, so '
    'a long run that rebuilds every client dataset every round grows without bound. Hence '
    "the memory target uses this process's per-round rise, not its peak."
  ]


def render_markdown(
  report: dict[str, Any], baseline: Optional[dict[str, Any]], changes: Optional[str]
) -> str:
  config = report['config']
  lines = [
    '# Round time: compute floor vs TFF FedAvg vs compression aggregators',
    '',
    'Generated by `benchmarks/round_time.py` (see its docstring for what each variant does).',
    '',
    f'- Data: {config["data_source"]}; {config["num_clients"]} IID clients, '
    f'{config["examples_per_client_description"]}; batch {config["batch_size"]}, '
    f'{config["local_epochs"]} local epoch(s); paper CNN; client SGD lr 0.01 momentum 0.9; '
    f"payload '{config['payload']}'.",
    f'- Timing: median of {config["rounds"]} timed rounds after 1 warm-up round per variant and '
    'scale; timed rounds interleaved across variants (order rotated each round). A round = '
    "building the K clients' tf.data pipelines + `process.next` (floor: local training + mean).",
    f"- Memory: peak RSS in MB, {report['memory_method']}, max over the timed rounds; 'main' = "
    "this Python process, 'worker' = TFF's worker_binary (a fresh one per K). 'Round rise' = "
    'peak during a round minus RSS just before it. Variants share both processes, so a peak '
    'includes memory retained from earlier rounds.',
    '- CPU s: user + system CPU seconds of this process and the worker during the round (median); '
    'less disturbed by other jobs than wall time. TFF runs the clients of a round concurrently '
    '(here on 2 cores) while the floor trains them one after another, so TFF can beat the '
    'floor in wall time; CPU time compares the work done.',
    *_growth_lines(report.get('main_process_growth')),
    _worker_threads_line(config.get('worker_intra_op_threads', 0)),
    f'- Machine: {report["environment"]["cpu_count"]} CPU cores (shared; load average '
    f'{report["environment"]["load_average_start"]} at start, '
    f'{report["environment"]["load_average_end"]} at end), TF {report["environment"]["tensorflow"]}, '
    f'TFF {report["environment"]["tensorflow_federated"]}. Total wall time '
    f'{report["total_wall_s"] / 60:.1f} min.',
    '',
    '## Per-round wall time',
    '',
    '| variant | group | K | median s/round | min | data_s | / floor (a) | / FedAvg (b) | '
    'CPU s | CPU / floor | CPU / FedAvg | peak main MB | peak worker MB | '
    'round rise main / worker MB | warm-up s |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in report['results']:
    lines.append(
      f'| {row["variant"]} | {row["group"]} | {row["clients_per_round"]} | '
      f'{row["median_s"]:.2f} | {row["min_s"]:.2f} | {row["data_median_s"]:.2f} | '
      f'{_fmt(row["ratio_to_floor"])} | {_fmt(row["ratio_to_fedavg"])} | '
      f'{row["cpu_median_s"]:.2f} | {_fmt(row["cpu_ratio_to_floor"])} | '
      f'{_fmt(row["cpu_ratio_to_fedavg"])} | '
      f'{row["peak_main_mb"]:.0f} | {_fmt(row["peak_worker_mb"], 0)} | '
      f'{row["rise_main_mb"]:.0f} / {_fmt(row["rise_worker_mb"], 0)} | {_fmt(row["warmup_s"], 1)} |'
    )
  lines += [
    '',
    '## One-time cost (process construction, incl. tracing)',
    '',
    '| variant | build s |',
    '|---|---|',
  ]
  lines += [f'| {name} | {seconds:.1f} |' for name, seconds in report['build_s'].items()]
  lines += [
    '',
    '## Targets',
    '',
    'Met / not met is judged on wall time (median s/round); the same ratios in CPU time are '
    'shown beside them.',
    '',
    '| target | result | wall time | CPU time |',
    '|---|---|---|---|',
  ]

  def joined(values):
    return '; '.join(
      f'{key}: {value:.3f}' if isinstance(value, float) else f'{key}: {value}'
      for key, value in values.items()
    )

  for target in report['targets']:
    lines.append(
      f'| {target["target"]} | {_met(target["met"])} | {joined(target["values"])} | '
      f'{joined(target.get("cpu_values", {})) or "—"} |'
    )
  if baseline is not None:
    lines += ['', '## Before/after', '']
    if changes:
      lines += [changes.strip(), '']
    lines += [
      'Medians of the earlier run (`--baseline`) and this one; machine load differs between runs, '
      'so compare the ratios to the floor (a) and to FedAvg (b), which are measured side by side '
      'within each run.',
      '',
      '| variant | K | before s | after s | before / floor | after / floor | '
      'before / FedAvg | after / FedAvg |',
      '|---|---|---|---|---|---|---|---|',
    ]
    before = {(r['variant'], r['clients_per_round']): r for r in baseline['results']}
    for row in report['results']:
      old = before.get((row['variant'], row['clients_per_round']))
      if old is None:
        continue
      lines.append(
        f'| {row["variant"]} | {row["clients_per_round"]} | {old["median_s"]:.2f} | '
        f'{row["median_s"]:.2f} | {_fmt(old["ratio_to_floor"])} | {_fmt(row["ratio_to_floor"])} | '
        f'{_fmt(old["ratio_to_fedavg"])} | {_fmt(row["ratio_to_fedavg"])} |'
      )
    lines += ['', '| variant | before build s | after build s |', '|---|---|---|']
    for name, seconds in report['build_s'].items():
      if name in baseline.get('build_s', {}):
        lines.append(f'| {name} | {baseline["build_s"][name]:.1f} | {seconds:.1f} |')
  return '\n'.join(lines) + '\n'


def build_report(
  measurements: list[Measurement],
  build_s: dict[str, float],
  scales: list[int],
  config: dict[str, Any],
  memory_method: str,
  environment: dict[str, Any],
  total_wall_s: float,
  main_growth: Optional[dict[str, float]] = None,
) -> dict[str, Any]:
  results = []
  for m in measurements:
    results.append(
      collections.OrderedDict(
        variant=m.variant,
        group=variant_spec(m.variant).group,
        description=variant_spec(m.variant).description,
        clients_per_round=m.clients_per_round,
        median_s=m.median_s,
        min_s=min(m.round_s),
        round_s=m.round_s,
        data_median_s=statistics.median(m.data_s),
        cpu_median_s=statistics.median(m.cpu_s),
        cpu_s=m.cpu_s,
        cpu_ratio_to_floor=cpu_ratio(measurements, m.variant, FLOOR, m.clients_per_round),
        cpu_ratio_to_fedavg=cpu_ratio(measurements, m.variant, FEDAVG, m.clients_per_round),
        warmup_s=m.warmup_s,
        ratio_to_floor=ratio(measurements, m.variant, FLOOR, m.clients_per_round),
        ratio_to_fedavg=ratio(measurements, m.variant, FEDAVG, m.clients_per_round),
        peak_main_mb=m.peak_main_bytes / _MB,
        peak_worker_mb=m.peak_worker_bytes / _MB if m.peak_worker_bytes else None,
        rise_main_mb=m.rise_main_bytes / _MB,
        rise_worker_mb=m.rise_worker_bytes / _MB if m.peak_worker_bytes else None,
      )
    )
  return collections.OrderedDict(
    config=config,
    environment=environment,
    memory_method=memory_method,
    total_wall_s=total_wall_s,
    build_s=build_s,
    main_process_growth=main_growth or {},
    results=results,
    targets=evaluate_targets(measurements, scales),
  )


def print_table(report: dict[str, Any]) -> None:
  print(
    f'{"variant":28s} {"K":>4s} {"s/round":>8s} {"/floor":>7s} {"/fedavg":>8s} {"CPU s":>6s} '
    f'{"/floor":>7s} {"/fedavg":>8s} {"main MB":>8s} {"worker MB":>9s}'
  )
  for row in report['results']:
    print(
      f'{row["variant"]:28s} {row["clients_per_round"]:4d} {row["median_s"]:8.2f} '
      f'{_fmt(row["ratio_to_floor"]):>7s} {_fmt(row["ratio_to_fedavg"]):>8s} '
      f'{row["cpu_median_s"]:6.2f} {_fmt(row["cpu_ratio_to_floor"]):>7s} '
      f'{_fmt(row["cpu_ratio_to_fedavg"]):>8s} '
      f'{row["peak_main_mb"]:8.0f} {_fmt(row["peak_worker_mb"], 0):>9s}'
    )
  for target in report['targets']:
    print(f'{_met(target["met"]):12s} {target["target"]}')


def measurements_from_report(report: dict[str, Any]) -> list[Measurement]:
  """The measurements behind an earlier run's JSON (the pipeline time only as its median)."""
  return [
    Measurement(
      variant=row['variant'],
      clients_per_round=row['clients_per_round'],
      round_s=list(row['round_s']),
      data_s=[row['data_median_s']],
      warmup_s=row['warmup_s'],
      peak_main_bytes=int(row['peak_main_mb'] * _MB),
      peak_worker_bytes=int((row['peak_worker_mb'] or 0) * _MB),
      rise_main_bytes=int(row['rise_main_mb'] * _MB),
      rise_worker_bytes=int((row['rise_worker_mb'] or 0) * _MB),
      cpu_s=list(row['cpu_s']),
    )
    for row in report['results']
  ]


def _read_optional(path: Optional[str]) -> Optional[str]:
  if not path:
    return None
  with open(path) as f:
    return f.read()


def write_outputs(report: dict[str, Any]) -> None:
  """Writes the JSON and markdown of `report` to --output, with --baseline and --changes."""
  baseline_text = _read_optional(_BASELINE.value)
  baseline = json.loads(baseline_text) if baseline_text else None
  output = _OUTPUT.value
  outputs.write_text(os.path.splitext(output)[0] + '.json', json.dumps(report, indent=2) + '\n')
  outputs.write_text(output, render_markdown(report, baseline, _read_optional(_CHANGES.value)))
  print_table(report)
  print(f'Wrote {output}')


def retarget(path: str) -> None:
  """Re-evaluates the targets of the run in `path` and rewrites its outputs."""
  with open(path) as f:
    report = json.load(f)
  report['targets'] = evaluate_targets(
    measurements_from_report(report), sorted(report['config']['clients_per_round'])
  )
  write_outputs(report)


def main(argv):
  del argv
  if _RETARGET.value:
    retarget(_RETARGET.value)
    return
  logging.set_verbosity(logging.WARNING)  # TFF logs every model construction at INFO.
  start = time.perf_counter()
  load_start = os.getloadavg()
  variant_names = list(dict.fromkeys(_VARIANTS.value))
  for name in variant_names:
    variant_spec(name)
  scales = sorted({int(k) for k in _CLIENTS_PER_ROUND.value})
  if not scales or scales[0] < 1:
    raise app.UsageError('--clients_per_round must list positive integers.')
  runtime.set_local_execution_context()

  data_dir = _DATA_DIR.value
  if (
    data_dir is None
    and _DATASET.value == 'mnist'
    and not os.environ.get('TFF_CLIPQ_MNIST_DIR')
    and os.path.isdir(_SHARED_MNIST_DIR)
  ):
    data_dir = _SHARED_MNIST_DIR
  federated = data_lib.build_federated_data(
    _DATASET.value, 'iid', _NUM_CLIENTS.value, _SEED.value, data_dir=data_dir
  )
  workload = Workload(
    input_shape=tuple(federated.input_shape),
    num_classes=federated.num_classes,
    batch_size=_BATCH_SIZE.value,
    local_epochs=_LOCAL_EPOCHS.value,
    payload=_PAYLOAD.value,
    seed=_SEED.value,
  )
  round_data = RoundData(federated, workload, _EXAMPLES_PER_CLIENT.value)
  sizes = list(federated.client_sizes.values())
  if _EXAMPLES_PER_CLIENT.value:
    sizes = [min(s, _EXAMPLES_PER_CLIENT.value) for s in sizes]
  examples = (
    f'{min(sizes)} examples per client'
    if min(sizes) == max(sizes)
    else f'{min(sizes)}-{max(sizes)} examples per client'
  )
  build_s, measurements, memory_method, main_growth = run_benchmark(
    variant_names,
    scales,
    _ROUNDS.value,
    round_data,
    workload,
    log=lambda message: print(message, flush=True),
    worker_intra_op_threads=_WORKER_INTRA_OP_THREADS.value or None,
  )
  config = collections.OrderedDict(
    dataset=_DATASET.value,
    data_source=federated.source,
    num_clients=len(federated.train.client_ids),
    examples_per_client=_EXAMPLES_PER_CLIENT.value,
    examples_per_client_description=examples,
    batch_size=_BATCH_SIZE.value,
    local_epochs=_LOCAL_EPOCHS.value,
    payload=_PAYLOAD.value,
    clients_per_round=scales,
    rounds=_ROUNDS.value,
    seed=_SEED.value,
    variants=variant_names,
    worker_intra_op_threads=_WORKER_INTRA_OP_THREADS.value,
  )
  environment = collections.OrderedDict(
    cpu_count=os.cpu_count(),
    load_average_start=' '.join(f'{x:.2f}' for x in load_start),
    load_average_end=' '.join(f'{x:.2f}' for x in os.getloadavg()),
    python=platform.python_version(),
    tensorflow=tf.__version__,
    tensorflow_federated=tff.__version__,
  )
  report = build_report(
    measurements,
    build_s,
    scales,
    config,
    memory_method,
    environment,
    time.perf_counter() - start,
    main_growth,
  )
  write_outputs(report)


if __name__ == '__main__':
  app.run(main)
