r"""Per-client CPU cost of the clipq aggregator next to the client's local training, one thread.

Replacing TFF's `MeanFactory` by clipq adds, per client, the client's encode (thresholds,
quantization, packing, error statistics, seed) and the server's decode, checks and weighted sum.
`round_time.py` measures that inside whole rounds, where background load moves a variant's median
by 10-15%, more than the 5% the target allows. Here each piece is timed alone, so the ratio is
precise:

  * local training of one client, the FedAvg client's work: the paper's CNN, SGD with momentum
    0.9 over the client's batches, in a `tf.function` (`round_time_floor.ClientTrainer`, the
    floor's loop in `round_time.py`), on random MNIST-shaped data, for each `--clients` size
    (examples:batch size);
  * FedAvg's per-client aggregation: adding the example-weighted update to the running sum;
  * clipq's encode, the aggregator's client step (`clipped_quantization.client.encode`), at 2 and
    4 bits, stochastic rounding, with the MSE-optimal `octav` threshold and with `max_abs` (which
    isolates the cost of the threshold search);
  * clipq's server side per client, the aggregator's accumulate step
    (`clipped_quantization.server.accumulate`: the payload's checks, its weights, the weighted
    sum of its decoded levels and float tensors, the statistics), one payload added to an empty
    accumulator.

Both clipq pieces run the library's own functions on the encoding plan and weighting of the very
factories the TFF part below times, so they measure what the aggregator runs.

Everything runs in one process with one intra-op and one inter-op thread, each piece in its own
`tf.function`, after warm-up. The pieces are timed round-robin in blocks of 10 calls (CPU time,
`time.process_time`), `--repeats` calls per piece in all, so a slow spell of the shared machine
hits every piece alike; each time is the median block mean, minus that of an empty `tf.function`
call with the same inputs (inside TFF the pieces are parts of one graph, with no call overhead of
their own).

Inside TFF the aggregator also costs the runtime's work per client (one more computation call per
client, its values' transfer). A second part times aggregation-only processes in TFF's own
runtime (`tff_clipq.runtime`'s local worker): `--tff_clients` random model updates of the CNN's
shapes aggregated by TFF's `MeanFactory` (what FedAvg uses), by clipq (2 and 4 bits, `octav`
and `max_abs`) and by TFF's min-max quantizer (`EncodedSumFactory.quantize_above_threshold` in a
`MeanFactory`), one round of each in turn (order rotated), `--tff_rounds` rounds, CPU seconds of
this process and the worker per round. The result is CPU ms per client, and what each
aggregator adds to `MeanFactory`'s: the aggregator's share of a FedAvg round is that divided by
the FedAvg round's CPU per client (`round_time.py`). This part runs once per worker setting in
`--tff_intra_op_threads` (threads per TensorFlow operation; 0: TensorFlow's default, one per
core), a fresh worker each.

  python benchmarks/aggregator_cost.py [--clients=100:20,600:32] [--repeats=200] \
      [--tff_clients=100] [--tff_rounds=20] [--tff_intra_op_threads=0,1]

Writes `benchmarks/results/aggregator_cost.{md,json}` (atomically).
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TensorFlow is imported.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # Run as a script from anywhere, without installing the package.
  sys.path.insert(0, _REPO_ROOT)

from benchmarks import bench_util  # pylint: disable=g-import-not-at-top
from benchmarks import round_time_floor
from tff_clipq import runtime  # pylint: disable=g-import-not-at-top
from tff_clipq.aggregators import clipped_quantization  # pylint: disable=g-import-not-at-top
from tff_clipq.aggregators.clipped_quantization import client as client_lib
from tff_clipq.aggregators.clipped_quantization import server as server_lib
from tff_clipq.experiments import outputs  # pylint: disable=g-import-not-at-top
from tff_clipq.learning import models  # pylint: disable=g-import-not-at-top
from tff_clipq.learning import process as process_lib

_OUTPUT = flags.DEFINE_string(
  'output',
  os.path.join(_REPO_ROOT, 'benchmarks', 'results', 'aggregator_cost.md'),
  'Markdown output; a JSON file with the same stem is written beside it.',
)
_CLIENTS = flags.DEFINE_list(
  'clients', ['100:20', '600:32'], 'Client sizes as examples:batch_size.'
)
_REPEATS = flags.DEFINE_integer('repeats', 200, 'Timed calls per piece.', lower_bound=5)
_TFF_CLIENTS = flags.DEFINE_integer(
  'tff_clients', 100, 'Clients per aggregation round in TFF (0: skip that part).', lower_bound=0
)
_TFF_ROUNDS = flags.DEFINE_integer(
  'tff_rounds', 20, 'Timed aggregation rounds per aggregator in TFF.', lower_bound=1
)
_TFF_INTRA_OP_THREADS = flags.DEFINE_list(
  'tff_intra_op_threads',
  ['0', '1'],
  "Threads per TensorFlow operation in TFF's worker, one TFF measurement each (0: "
  "TensorFlow's default, one per core).",
)
_MIN_SIZE_TO_QUANTIZE = 128  # As in round_time.py and the experiments: biases stay float32.


_CALLS_PER_BLOCK = 10


def interleaved_cpu_ms(
  pieces: dict[str, tuple[Callable[..., Any], tuple]], repeats: int
) -> dict[str, float]:
  """Median CPU milliseconds per call of each `fn(*args)`, timed round-robin.

  Each round times a block of `_CALLS_PER_BLOCK` calls of every piece in turn, so slow drifts of
  the machine's speed (frequent on shared hosts) hit all pieces alike instead of biasing whichever
  ran during a slow spell; the result is the median over rounds of each block's mean.
  """
  for fn, args in pieces.values():  # Warm-up: tracing, then first-call effects.
    for _ in range(2):
      fn(*args)
  block_means = {name: [] for name in pieces}
  for _ in range(max(1, repeats // _CALLS_PER_BLOCK)):
    for name, (fn, args) in pieces.items():
      start = time.process_time()
      for _ in range(_CALLS_PER_BLOCK):
        fn(*args)
      block_means[name].append((time.process_time() - start) / _CALLS_PER_BLOCK)
  return {name: 1e3 * statistics.median(means) for name, means in block_means.items()}


def parse_clients(specs: list[str]) -> list[tuple[int, int]]:
  sizes = []
  for spec in specs:
    try:
      examples, batch = (int(part) for part in spec.split(':'))
    except ValueError:
      raise app.UsageError(f'--clients entries must be examples:batch_size. Found {spec!r}.')
    if examples < 1 or batch < 1:
      raise app.UsageError(f'--clients entries must be positive. Found {spec!r}.')
    sizes.append((examples, batch))
  return sizes


def _cnn_shapes() -> list[tuple[int, ...]]:
  """The shapes of the paper CNN's trainable tensors (the value every aggregator here gets)."""
  model = models.create_keras_model('cnn', seed=0)
  return [tuple(v.shape) for v in model.trainable_variables]


def _value_type(shapes: list[tuple[int, ...]]) -> tff.types.Type:
  return tff.StructWithPythonType([tff.TensorType(np.float32, shape) for shape in shapes], list)


def _clipq_pieces(
  factory: tff.aggregators.WeightedAggregationFactory,
  update: list[tf.Tensor],
  weight: tf.Tensor,
  round_seed: tf.Tensor,
) -> tuple[Callable[..., Any], Callable[..., Any], tuple]:
  """(encode, server, server's args) of `factory`'s aggregator, as its TFF computations run them.

  `encode` is the client's `client.encode`; `server` is one call of the accumulate step,
  `server.accumulate`, adding one client's payload to an empty accumulator. Both run on the
  plan, weighting and accumulator of the process `factory` builds for the CNN's update.

  Args:
    factory: a `clipped_quantization_mean` factory.
    update: one client's model update.
    weight: the client's weight.
    round_seed: the round's seed.
  """
  settings = factory.settings
  value_type = _value_type([tuple(t.shape) for t in update])
  # The codec says which parts of the client's payload the accumulate step takes, and with
  # them whether it sums the float tensors too (it does for the default inner `SumFactory`).
  codec = clipped_quantization.build_codec(
    settings, tff.aggregators.SumFactory(), value_type, tff.TensorType(np.float32)
  )
  plan = settings.plan_for(value_type)
  float_types = [tff.TensorType(np.float32, plan.tensors[i].shape) for i in plan.float_indices]
  zero = server_lib.zero_accumulator(plan, float_types, 'weighted_floats' in codec.aggregate_keys)
  encode = tf.function(
    lambda value: client_lib.encode(plan, settings.weighting, value, round_seed, weight)
  )
  encoded = encode(update)
  payload = collections.OrderedDict((key, encoded[key]) for key in codec.aggregate_keys)
  server = tf.function(
    lambda accumulator, value: server_lib.accumulate(plan, settings.weighting, accumulator, value)
  )
  return encode, server, (zero, payload)


def measure(client_sizes: list[tuple[int, int]], repeats: int) -> dict[str, Any]:
  """CPU ms per call of each piece, local training per client size, and clipq's overhead.

  Args:
    client_sizes: (examples, batch size) of the clients whose local training is timed.
    repeats: timed calls per piece.
  """
  shapes = _cnn_shapes()
  update = [0.01 * tf.random.stateless_normal(s, seed=[i, 0]) for i, s in enumerate(shapes)]
  totals = [tf.zeros(s) for s in shapes]
  weight = tf.constant(100.0)
  round_seed = tf.constant(7, tf.int64)
  factories = tff_aggregators()

  empty = tf.function(lambda *args: tf.constant(0.0))
  timed = collections.OrderedDict()  # name -> (fn, args, name of its call-overhead piece)
  timed['overhead: update'] = (empty, (update,), None)
  timed['overhead: update + sums'] = (empty, (update, totals), None)
  fedavg_sum = tf.function(lambda value, sums: [s + weight * v for s, v in zip(sums, value)])
  timed['fedavg_aggregation'] = (fedavg_sum, (update, totals), 'overhead: update + sums')
  for bits in (2, 4):
    for clipping in ('octav', 'max_abs'):
      encode, server, server_args = _clipq_pieces(
        factories[f'clipq_{bits}b_{clipping}'], update, weight, round_seed
      )
      timed[f'clipq_{bits}b_{clipping}_encode'] = (encode, (update,), 'overhead: update')
      if clipping != 'octav':
        continue
      timed[f'overhead: clipq_{bits}b_server'] = (empty, server_args, None)
      timed[f'clipq_{bits}b_server'] = (server, server_args, f'overhead: clipq_{bits}b_server')

  config = process_lib.ProcessConfig()
  trainer = round_time_floor.ClientTrainer(
    models.create_keras_model('cnn', seed=0),
    config.client_learning_rate,
    config.client_momentum,
  )
  train = tf.function(trainer.train)
  for examples, batch_size in client_sizes:
    images = tf.random.stateless_uniform([examples, 28, 28, 1], seed=[examples, 1])
    labels = tf.random.stateless_uniform([examples], seed=[examples, 2], maxval=10, dtype=tf.int32)
    batches = collections.OrderedDict(x=images, y=labels)  # As `ClientTrainer.train` reads them.
    dataset = tf.data.Dataset.from_tensor_slices(batches).batch(batch_size)
    timed[f'training: {examples}:{batch_size}'] = (train, (dataset,), 'overhead: update')

  raw = interleaved_cpu_ms({name: (fn, args) for name, (fn, args, _) in timed.items()}, repeats)
  net = {  # Inside TFF the pieces are parts of one graph, with no call overhead of their own.
    name: max(raw[name] - raw[overhead], 0.0)
    for name, (_, _, overhead) in timed.items()
    if overhead is not None
  }
  overhead = {
    name.split(': ', 1)[1]: ms for name, ms in raw.items() if name.startswith('overhead: ')
  }
  training = collections.OrderedDict(
    (name.split(': ', 1)[1], ms) for name, ms in net.items() if name.startswith('training: ')
  )
  pieces = collections.OrderedDict(
    (name, ms) for name, ms in net.items() if not name.startswith('training: ')
  )

  overheads = collections.OrderedDict()
  for size, train_ms in training.items():
    fedavg_ms = train_ms + pieces['fedavg_aggregation']
    for bits in (2, 4):
      added = (
        pieces[f'clipq_{bits}b_octav_encode']
        + pieces[f'clipq_{bits}b_server']
        - pieces['fedavg_aggregation']
      )
      overheads[f'clipq_{bits}b @ {size}'] = collections.OrderedDict(
        added_ms=added,
        fedavg_client_ms=fedavg_ms,
        ratio=1.0 + added / fedavg_ms,
        threshold_share=(
          pieces[f'clipq_{bits}b_octav_encode'] - pieces[f'clipq_{bits}b_max_abs_encode']
        )
        / added,
      )
  return collections.OrderedDict(
    call_overhead_ms=overhead, pieces_ms=pieces, local_training_ms=training, overheads=overheads
  )


def tff_aggregators() -> dict[str, tff.aggregators.WeightedAggregationFactory]:
  """The aggregators timed inside TFF, `MeanFactory` (FedAvg's) first."""
  factories = collections.OrderedDict(mean_factory=tff.aggregators.MeanFactory())
  for bits in (2, 4):
    for clipping in ('octav', 'max_abs'):
      factories[f'clipq_{bits}b_{clipping}'] = clipped_quantization.clipped_quantization_mean(
        bits=bits, clipping=clipping, min_size_to_quantize=_MIN_SIZE_TO_QUANTIZE
      )
    factories[f'tff_encoded_{bits}b'] = tff.aggregators.MeanFactory(
      tff.aggregators.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=bits, threshold=_MIN_SIZE_TO_QUANTIZE
      )
    )
  return factories


def parse_thread_counts(specs: list[str]) -> list[int]:
  """`--tff_intra_op_threads` as non-negative ints (0: TensorFlow's default)."""
  try:
    counts = [int(spec) for spec in specs]
  except ValueError:
    counts = None
  if not counts or min(counts) < 0:
    raise app.UsageError(
      f'--tff_intra_op_threads must list non-negative integers. Found {",".join(specs)!r}.'
    )
  return counts


def measure_in_tff(clients: int, rounds: int, intra_op_threads: int = 0) -> dict[str, Any]:
  """CPU ms per client of aggregation-only rounds in TFF's runtime, and the excess over the mean.

  `intra_op_threads`: threads per TensorFlow operation in the worker (0: TensorFlow's default).
  """
  shapes = _cnn_shapes()
  value_type = _value_type(shapes)
  rng = np.random.default_rng(0)
  values = [
    [(0.01 * rng.standard_normal(shape)).astype(np.float32) for shape in shapes]
    for _ in range(clients)
  ]
  weights = [100.0] * clients
  runtime.set_local_execution_context(intra_op_threads=intra_op_threads or None)
  try:
    processes = {
      name: factory.create(value_type, tff.TensorType(np.float32))
      for name, factory in tff_aggregators().items()
    }
    states = {name: process.initialize() for name, process in processes.items()}
    cpu_s = {name: [] for name in processes}
    names = list(processes)
    for round_index in range(rounds + 1):  # Round 0 warms up.
      shift = round_index % len(names)
      for name in names[shift:] + names[:shift]:
        start = bench_util.cpu_seconds_with_workers()
        states[name] = processes[name].next(states[name], values, weights).state
        if round_index:
          cpu_s[name].append(bench_util.cpu_seconds_with_workers() - start)
  finally:
    runtime.reset_execution_context()
  per_client = collections.OrderedDict(
    (name, 1e3 * statistics.median(seconds) / clients) for name, seconds in cpu_s.items()
  )
  return collections.OrderedDict(
    clients=clients,
    rounds=rounds,
    intra_op_threads=intra_op_threads,
    cpu_ms_per_client=per_client,
    added_ms_per_client=collections.OrderedDict(
      (name, ms - per_client['mean_factory'])
      for name, ms in per_client.items()
      if name != 'mean_factory'
    ),
  )


def markdown(report: dict[str, Any]) -> str:
  lines = [
    '# Aggregator cost per client (one CPU thread)',
    '',
    'Generated by `benchmarks/aggregator_cost.py` (see its docstring). CPU ms per call, median '
    f'block mean of {report["repeats"]} calls timed round-robin, `tf.function` call overhead '
    f'subtracted '
    f'({", ".join(f"{k}: {v:.2f}" for k, v in report["call_overhead_ms"].items())} ms).',
    '',
    '| piece | CPU ms |',
    '|---|---:|',
  ]
  lines += [f'| {name} | {ms:.2f} |' for name, ms in report['pieces_ms'].items()]
  lines += [
    f'| local training, {size} (examples:batch) | {ms:.2f} |'
    for size, ms in report['local_training_ms'].items()
  ]
  lines += [
    '',
    '| clipq at client size | added ms per client | FedAvg client ms | '
    'clipq / FedAvg per client | share of the threshold search |',
    '|---|---:|---:|---:|---:|',
  ]
  lines += [
    f'| {name} | {o["added_ms"]:.2f} | {o["fedavg_client_ms"]:.2f} | {o["ratio"]:.3f} '
    f'| {o["threshold_share"]:.0%} |'
    for name, o in report['overheads'].items()
  ]
  for tff_report in report.get('tff', []):
    setting = bench_util.describe_intra_op_threads(tff_report['intra_op_threads'])
    lines += [
      '',
      f'## Inside TFF: aggregation-only rounds of {tff_report["clients"]} clients, '
      f'worker with {setting}',
      '',
      f"CPU of this process and TFF's worker per round, median of {tff_report['rounds']} "
      'interleaved rounds, per client.',
      '',
      '| aggregator | CPU ms per client | added to MeanFactory, ms per client |',
      '|---|---:|---:|',
    ]
    for name, ms in tff_report['cpu_ms_per_client'].items():
      added = tff_report['added_ms_per_client'].get(name)
      lines.append(f'| {name} | {ms:.2f} | {"—" if added is None else f"{added:.2f}"} |')
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  del argv
  client_sizes = parse_clients(_CLIENTS.value)
  thread_counts = parse_thread_counts(_TFF_INTRA_OP_THREADS.value)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  report = measure(client_sizes, _REPEATS.value)
  report['repeats'] = _REPEATS.value
  if _TFF_CLIENTS.value:
    report['tff'] = [
      measure_in_tff(_TFF_CLIENTS.value, _TFF_ROUNDS.value, threads) for threads in thread_counts
    ]
  report['tensorflow'] = tf.__version__
  output = _OUTPUT.value
  outputs.write_text(os.path.splitext(output)[0] + '.json', json.dumps(report, indent=2) + '\n')
  text = markdown(report)
  outputs.write_text(output, text)
  print(text)
  print(f'Wrote {output}')


if __name__ == '__main__':
  app.run(main)
