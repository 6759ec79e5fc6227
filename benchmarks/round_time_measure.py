"""How `round_time.py` measures: the rounds' client data, the timed rounds, the records.

`RoundData` builds the clients' `tf.data` pipelines of round r at K clients per round, the same
for every variant. `run_benchmark` builds every variant, then at each K runs a warm-up round and
the timed rounds, interleaved across variants (order rotated per round), recording wall time,
pipeline time, CPU seconds of this process and TFF's worker, and peak memory
(`bench_util.PeakMemory`) in one `Measurement` per variant and K.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
import time
from typing import Callable, Optional, Union

import numpy as np
import tensorflow as tf

from benchmarks import bench_util
from benchmarks import round_time_floor
from benchmarks import round_time_variants as variants
from tff_clipq import data as data_lib
from tff_clipq import runtime

Variant = Union[round_time_floor.KerasFloor, variants.TffVariant]


class RoundData:
  """Builds the clients' training pipelines of round r at scale K (same for every variant).

  Args:
    federated: the split training data.
    workload: what all variants share (batch size, epochs and seed of the pipelines).
    examples_per_client: if > 0, each client uses only its first this many examples.
  """

  def __init__(
    self,
    federated: data_lib.FederatedData,
    workload: variants.Workload,
    examples_per_client: int,
  ):
    self._train = federated.train
    self._client_ids = list(federated.train.client_ids)
    self._client_sizes = list(federated.client_sizes.values())
    self._workload = workload
    self._examples_per_client = examples_per_client
    self.datasets_built = 0

  def examples_description(self) -> str:
    """The clients' sizes as the report states them, e.g. '100 examples per client'."""
    sizes = self._client_sizes
    if self._examples_per_client:
      sizes = [min(s, self._examples_per_client) for s in sizes]
    if min(sizes) == max(sizes):
      return f'{min(sizes)} examples per client'
    return f'{min(sizes)}-{max(sizes)} examples per client'

  def client_ids(self, clients_per_round: int, round_index: int) -> list[str]:
    """The clients of round `round_index` (-1: the warm-up) at `clients_per_round`.

    Args:
      clients_per_round: K.
      round_index: the round, which seeds the sample with the workload's seed and K.
    """
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

  @property
  def cpu_median_s(self) -> float:
    return statistics.median(self.cpu_s)


def build_variant(spec: variants.VariantSpec, workload: variants.Workload) -> Variant:
  """The floor for a variant without a TFF method, else its TFF process.

  Args:
    spec: the variant.
    workload: what all variants share.
  """
  if spec.method is None:
    return round_time_floor.KerasFloor(spec, workload)
  return variants.TffVariant(spec, workload)


def timed_round(
  variant: Variant, round_data: RoundData, client_ids: list[str]
) -> tuple[float, float]:
  """(round seconds, of which building the pipelines) of one round of `variant`.

  Args:
    variant: as from `build_variant`.
    round_data: builds the clients' pipelines.
    client_ids: the round's clients.
  """
  start = time.perf_counter()
  datasets = round_data.datasets(client_ids)
  built = time.perf_counter()
  variant.run_round(datasets)
  end = time.perf_counter()
  return end - start, built - start


def _worker_pid() -> Optional[int]:
  pids = runtime.live_worker_pids()
  return pids[-1] if pids else None


def _record_round(
  m: Measurement, name: str, memory: bench_util.PeakMemory, seconds: tuple[float, float, float]
) -> None:
  """Adds one timed round (wall, pipeline, CPU seconds) and its memory to `m`."""
  wall, data, cpu = seconds
  m.round_s.append(wall)
  m.data_s.append(data)
  m.cpu_s.append(cpu)
  m.peak_main_bytes = max(m.peak_main_bytes, memory.peaks.get('main', 0))
  m.rise_main_bytes = max(m.rise_main_bytes, memory.rises.get('main', 0))
  if variants.variant_spec(name).method is not None:  # The floor runs without the worker.
    m.peak_worker_bytes = max(m.peak_worker_bytes, memory.peaks.get('worker', 0))
    m.rise_worker_bytes = max(m.rise_worker_bytes, memory.rises.get('worker', 0))


def run_benchmark(
  variant_names: list[str],
  scales: list[int],
  rounds: int,
  round_data: RoundData,
  workload: variants.Workload,
  log: Callable[[str], None] = print,
  worker_intra_op_threads: Optional[int] = None,
) -> tuple[dict[str, float], list[Measurement], str, dict[str, float]]:
  """Builds every variant, then measures each scale (TFF's worker with `worker_intra_op_threads`).

  Args:
    variant_names: the variants, in the order of the first timed round.
    scales: the numbers of clients per round K, ascending.
    rounds: timed rounds per variant and K (after one warm-up round).
    round_data: builds the clients' pipelines.
    workload: what all variants share.
    log: called with a line of progress.
    worker_intra_op_threads: threads per TensorFlow operation in TFF's worker (None: default).

  Returns:
    (build_s, measurements, memory method, main-process growth): the last gives this process's
    RSS after the first scale (warm-ups done) and at the end, and the client datasets built in
    between.
  """
  built, build_s = {}, {}
  # TFF variants first: TFF builds Keras models inside graphs, which invalidates Keras models
  # made earlier outside them (Keras' v1 layer check), so the plain-TF floors come last.
  for name in sorted(variant_names, key=lambda n: variants.variant_spec(n).method is None):
    start = time.perf_counter()
    built[name] = build_variant(variants.variant_spec(name), workload)
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
      by_name[name].warmup_s, _ = timed_round(built[name], round_data, warmup_ids)
      log(f'K={clients_per_round} warm-up {name}: {by_name[name].warmup_s:.2f} s')
    for round_index in range(rounds):
      client_ids = round_data.client_ids(clients_per_round, round_index)
      shift = round_index % len(variant_names)
      for name in variant_names[shift:] + variant_names[:shift]:
        worker_pid = _worker_pid()
        cpu_start = bench_util.cpu_seconds_with_workers()
        with bench_util.PeakMemory({'main': os.getpid(), 'worker': worker_pid}) as memory:
          seconds, data_seconds = timed_round(built[name], round_data, client_ids)
        cpu = bench_util.cpu_seconds_with_workers() - cpu_start
        memory_method = memory.method
        _record_round(by_name[name], name, memory, (seconds, data_seconds, cpu))
        log(f'K={clients_per_round} round {round_index} {name}: {seconds:.2f} s, CPU {cpu:.2f} s')
    measurements.extend(by_name.values())
    if rss_after_first_scale is None:  # After the first scale, warm-up allocations are done.
      rss_after_first_scale = bench_util.rss_bytes(os.getpid()) or 0
      datasets_before = round_data.datasets_built
  growth = collections.OrderedDict(
    main_rss_after_first_scale_mb=(rss_after_first_scale or 0) / bench_util.MB,
    main_rss_end_mb=(bench_util.rss_bytes(os.getpid()) or 0) / bench_util.MB,
    client_datasets_built=round_data.datasets_built - datasets_before,
  )
  return build_s, measurements, memory_method, growth
