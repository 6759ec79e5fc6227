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
  (c) `tff_encoded_{2,4}b`: TFF's built-in quantization, `EncodedSumFactory.quantize_above_threshold`
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

This file holds the command line; the rest is split by concern: `round_time_variants.py` (what
each variant runs), `round_time_floor.py` (the plain-TF floor), `round_time_measure.py` (client
data, timed rounds, memory), `round_time_targets.py` (the targets) and `round_time_report.py`
(JSON, markdown and console output).
"""

from __future__ import annotations

import collections
import json
import os
import platform
import sys
import time
from typing import Any, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TensorFlow is imported.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # Run as a script from anywhere, without installing the package.
  sys.path.insert(0, _REPO_ROOT)

from benchmarks import round_time_measure as measure  # pylint: disable=g-import-not-at-top
from benchmarks import round_time_report as report_lib
from benchmarks import round_time_targets as targets
from benchmarks import round_time_variants as variants
from tff_clipq import data as data_lib
from tff_clipq import runtime
from tff_clipq.experiments import outputs
from tff_clipq.learning import process as process_lib

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
  list(variants.ALL_VARIANTS),
  f'Variants to run, among {variants.ALL_VARIANTS}.',
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
  "Data directory (default: the library's source chain, see `tff_clipq.data.sources`: "
  '$TFF_CLIPQ_MNIST_DIR, the Keras cache, known local copies, else a download).',
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
  outputs.write_text(
    output, report_lib.render_markdown(report, baseline, _read_optional(_CHANGES.value))
  )
  report_lib.print_table(report)
  print(f'Wrote {output}')


def retarget(path: str) -> None:
  """Re-evaluates the targets of the run in `path` and rewrites its outputs."""
  with open(path) as f:
    report = json.load(f)
  report['targets'] = targets.evaluate_targets(
    report_lib.measurements_from_report(report), sorted(report['config']['clients_per_round'])
  )
  write_outputs(report)


def _run_config(
  federated: data_lib.FederatedData,
  round_data: measure.RoundData,
  scales: list[int],
  variant_names: list[str],
) -> collections.OrderedDict:
  """The run's settings as the report records them.

  Args:
    federated: the split training data.
    round_data: builds the clients' pipelines.
    scales: the numbers of clients per round K.
    variant_names: the variants run.
  """
  return collections.OrderedDict(
    dataset=_DATASET.value,
    data_source=federated.source,
    num_clients=len(federated.train.client_ids),
    examples_per_client=_EXAMPLES_PER_CLIENT.value,
    examples_per_client_description=round_data.examples_description(),
    batch_size=_BATCH_SIZE.value,
    local_epochs=_LOCAL_EPOCHS.value,
    payload=_PAYLOAD.value,
    clients_per_round=scales,
    rounds=_ROUNDS.value,
    seed=_SEED.value,
    variants=variant_names,
    worker_intra_op_threads=_WORKER_INTRA_OP_THREADS.value,
  )


def _environment(load_start: tuple[float, float, float]) -> collections.OrderedDict:
  """The machine's cores and load, and the library versions."""
  return collections.OrderedDict(
    cpu_count=os.cpu_count(),
    load_average_start=' '.join(f'{x:.2f}' for x in load_start),
    load_average_end=' '.join(f'{x:.2f}' for x in os.getloadavg()),
    python=platform.python_version(),
    tensorflow=tf.__version__,
    tensorflow_federated=tff.__version__,
  )


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
    variants.variant_spec(name)
  scales = sorted({int(k) for k in _CLIENTS_PER_ROUND.value})
  if not scales or scales[0] < 1:
    raise app.UsageError('--clients_per_round must list positive integers.')
  runtime.set_local_execution_context()

  federated = data_lib.build_federated_data(
    _DATASET.value, 'iid', _NUM_CLIENTS.value, _SEED.value, data_dir=_DATA_DIR.value
  )
  workload = variants.Workload(
    input_shape=tuple(federated.input_shape),
    num_classes=federated.num_classes,
    batch_size=_BATCH_SIZE.value,
    local_epochs=_LOCAL_EPOCHS.value,
    payload=_PAYLOAD.value,
    seed=_SEED.value,
  )
  round_data = measure.RoundData(federated, workload, _EXAMPLES_PER_CLIENT.value)
  build_s, measurements, memory_method, main_growth = measure.run_benchmark(
    variant_names,
    scales,
    _ROUNDS.value,
    round_data,
    workload,
    log=lambda message: print(message, flush=True),
    worker_intra_op_threads=_WORKER_INTRA_OP_THREADS.value or None,
  )
  report = report_lib.build_report(
    measurements,
    build_s,
    scales,
    _run_config(federated, round_data, scales, variant_names),
    memory_method,
    _environment(load_start),
    time.perf_counter() - start,
    main_growth,
  )
  write_outputs(report)


if __name__ == '__main__':
  app.run(main)
