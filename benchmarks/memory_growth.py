"""Memory of long runs: the RSS of the Python process round after round.

The issue: building every client's dataset afresh grew the process without bound (~70-80 KB per
dataset). This runs the training program itself (`program.run_experiment`, local worker) for many
rounds with a small model and records, after every round, the resident set size of this process
and of the TFF worker. A background thread reads the RSS whenever the program's `metrics.csv`
gains a row, so the program runs unchanged. `--mode=data` instead loops over the rounds' client
datasets only, built as the program builds them (`program.sample_clients`,
`program.client_shuffle_seed`, `preprocess_for_training(create_tf_dataset_for_client(...))`),
and serializes each as TFF does with a computation's dataset argument (`DatasetToGraphV2`): the
data path alone, without TFF. `--iterate` iterates them in eager mode instead (TensorFlow keeps
~0.9 KB per eager iterator, even without a map; the program never iterates them in Python).
Program mode also covers what the program does besides the data path: the checkpoint after every
round (one `.npz`; a SavedModel per round through TFF's `FileProgramStateManager` kept ~35-40 KB
per round), the metrics CSV and the TensorBoard events (written without TensorFlow: every eager
`tf.summary.scalar` keeps ~0.3-0.6 KB).

Default setting: MNIST (`$TFF_CLIPQ_MNIST_DIR` or the runner's source chain) split IID over 600
clients of 100 examples, 10 clients per round, the logistic model, float32 aggregation, batch 32,
one local epoch, evaluation on 500 test examples every 100 rounds.

  python benchmarks/memory_growth.py [--rounds=1000] [--mode=program|data]
      [--results=benchmarks/results/memory_growth] [--baseline=<earlier result .json>]
      [--report_only]

About 10-15 minutes for 1,000 rounds in program mode on 2 shared cores (data mode: about a minute).
Writes `<results>.json` (every round's RSS), `<results>.md` (summary and every 100th round) and
`<results>.png` (the curve; with `--baseline`, that run's dashed), and prints the summary.
`--report_only` rewrites the .md/.png from `<results>.json`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import textwrap
import threading
import time
from typing import Any, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TensorFlow is imported.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_util  # pylint: disable=g-import-not-at-top
from tff_clipq import data as data_lib  # pylint: disable=g-import-not-at-top
from tff_clipq import runtime  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import config as config_lib  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import outputs  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import program  # pylint: disable=g-import-not-at-top

_MODE = flags.DEFINE_enum('mode', 'program', ['program', 'data'], 'What runs (module docstring).')
_ROUNDS = flags.DEFINE_integer('rounds', 1000, 'Rounds to run.')
_WARMUP = flags.DEFINE_integer('warmup_rounds', 100, 'Rounds before the drift is measured.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 600, 'Clients the training set is split into.')
_CLIENTS_PER_ROUND = flags.DEFINE_integer('clients_per_round', 10, 'Clients per round.')
_DATASET = flags.DEFINE_string('dataset', 'mnist', 'Dataset.')
_MODEL = flags.DEFINE_string('model', 'logistic', 'Model.')
_AGGREGATOR = flags.DEFINE_string('aggregator', 'float', 'Aggregator.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 100, 'Evaluate every this many rounds.')
_RUN_DIR = flags.DEFINE_string('run_dir', '/tmp/tff_clipq_memory_growth', 'Program output dir.')
_RESULTS = flags.DEFINE_string('results', 'benchmarks/results/memory_growth', 'Path prefix.')
_BASELINE = flags.DEFINE_string('baseline', '', 'An earlier result .json to compare with.')
_ITERATE = flags.DEFINE_bool('iterate', False, 'Data mode: iterate instead of serializing.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Rewrite .md/.png from <results>.json.')

MB = bench_util.MB


def experiment_config(rounds: int) -> config_lib.ExperimentConfig:
  """The run's settings (module docstring)."""
  return config_lib.ExperimentConfig(
    dataset=_DATASET.value,
    num_clients=_NUM_CLIENTS.value,
    clients_per_round=_CLIENTS_PER_ROUND.value,
    rounds=rounds,
    model=_MODEL.value,
    aggregator=_AGGREGATOR.value,
    batch_size=32,
    eval_every=_EVAL_EVERY.value,
    max_eval_examples=500,
    output_dir=_RUN_DIR.value,
    overwrite=True,
  )


def _worker_rss_mb() -> Optional[float]:
  sizes = [bench_util.rss_bytes(pid) for pid in runtime.live_worker_pids()]
  sizes = [size for size in sizes if size is not None]
  return sum(sizes) / MB if sizes else None


def _sample(samples: list[dict[str, Any]], round_num: int, started: float) -> None:
  seconds, rss_mb = time.monotonic() - started, bench_util.rss_bytes(os.getpid()) / MB
  samples.append(
    dict(round=round_num, seconds=seconds, rss_mb=rss_mb, worker_rss_mb=_worker_rss_mb())
  )


def run_program(config: config_lib.ExperimentConfig) -> list[dict[str, Any]]:
  """Runs the program; the RSS is read whenever `metrics.csv` gains a row (one per round)."""
  samples: list[dict[str, Any]] = []
  csv_path = os.path.join(config.output_dir, program.METRICS_CSV)
  done = threading.Event()
  started = time.monotonic()

  def poll() -> None:
    seen = 0
    while not done.wait(0.05):
      try:
        with open(csv_path) as f:
          rows = sum(1 for _ in f) - 1  # Header.
      except OSError:
        continue
      if rows > seen:
        seen = rows
        _sample(samples, rows, started)

  shutil.rmtree(config.output_dir, ignore_errors=True)  # `overwrite`, before polling starts.
  _sample(samples, 0, started)
  thread = threading.Thread(target=poll, daemon=True)
  thread.start()
  try:
    program.run_experiment(config)
  finally:
    done.set()
    thread.join()
  return samples


def run_data(config: config_lib.ExperimentConfig) -> list[dict[str, Any]]:
  """Builds every round's client datasets as the program's round loop does; serializes them."""
  data = program.build_data(config)
  samples: list[dict[str, Any]] = []
  started = time.monotonic()
  _sample(samples, 0, started)
  for round_num in range(1, config.rounds + 1):
    client_ids = program.sample_clients(
      data.train.client_ids, config.clients_per_round, config.seed, round_num
    )
    for position, client_id in enumerate(client_ids):
      dataset = data_lib.preprocess_for_training(
        data.train.create_tf_dataset_for_client(client_id),
        config.batch_size,
        config.local_epochs,
        program.client_shuffle_seed(config.seed, round_num, position),
      )
      if _ITERATE.value:
        for _ in dataset:
          pass
      else:
        tf.raw_ops.DatasetToGraphV2(input_dataset=tf.data.experimental.to_variant(dataset))
    _sample(samples, round_num, started)
  return samples


def summarize(samples: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
  """RSS after warm-up, at the end, its range and least-squares slope over rounds >= warmup."""
  after = [s for s in samples if s['round'] >= warmup] or samples
  rounds = np.array([s['round'] for s in after], dtype=float)
  rss = np.array([s['rss_mb'] for s in after])
  slope = float(np.polyfit(rounds, rss, 1)[0]) if len(after) > 1 else 0.0
  seconds = np.array([s['seconds'] for s in after])
  round_s = np.diff(seconds) / np.maximum(np.diff(rounds), 1) if len(after) > 1 else [0.0]
  return dict(
    rounds=samples[-1]['round'],
    warmup_rounds=warmup,
    rss_start_mb=samples[0]['rss_mb'],
    rss_after_warmup_mb=after[0]['rss_mb'],
    rss_end_mb=samples[-1]['rss_mb'],
    drift_mb=round(after[-1]['rss_mb'] - after[0]['rss_mb'], 2),
    range_after_warmup_mb=round(float(rss.max() - rss.min()), 2),
    slope_kb_per_round=round(slope * 1024, 2),
    worker_rss_after_warmup_mb=after[0]['worker_rss_mb'],
    worker_rss_end_mb=samples[-1]['worker_rss_mb'],
    seconds=samples[-1]['seconds'],
    median_round_s=round(float(np.median(round_s)), 3),
  )


def write_plot(path: str, result: dict[str, Any], baseline: Optional[dict[str, Any]]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axis = plt.subplots(figsize=(7, 4.4))
  for run, style in ((baseline, '--'), (result, '-')):
    suffix = ' (baseline)' if run is baseline else ''
    for key, label, color in (('rss_mb', 'Python', 'C0'), ('worker_rss_mb', 'TFF worker', 'C1')):
      points = [(s['round'], s[key]) for s in (run or {}).get('samples', []) if s[key] is not None]
      if points:
        axis.plot(*zip(*points), style, color=color, label=label + suffix)
  axis.set_xlabel('round')
  axis.set_ylabel('RSS (MB)')
  axis.set_ylim(bottom=0)
  axis.set_title(textwrap.fill(result['setting'], 90), fontsize=8)
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  figure.savefig(path + '.tmp.png', dpi=110)
  plt.close(figure)
  os.replace(path + '.tmp.png', path)


def _summary_row(name: str, s: dict[str, Any]) -> str:
  return (
    f'| {name} | {s["rounds"]} | {s["rss_after_warmup_mb"]:.1f} | {s["rss_end_mb"]:.1f} '
    f'| {s["drift_mb"]:+.1f} | {s["range_after_warmup_mb"]:.1f} | {s["slope_kb_per_round"]:+.1f} '
    f'| {_mb(s["worker_rss_after_warmup_mb"])} -> {_mb(s["worker_rss_end_mb"])} '
    f'| {s["seconds"]:.0f} | {s.get("median_round_s", 0):.3f} |'
  )


def markdown(result: dict[str, Any], baseline: Optional[dict[str, Any]]) -> str:
  s = result['summary']
  lines = [
    '# Memory over a long run',
    '',
    f'Command: `{result["command"]}`',
    '',
    f'Setting: {result["setting"]}',
    '',
    f'| run | rounds | RSS at round {s["warmup_rounds"]} (MB) | RSS at the end (MB) | drift (MB) '
    '| range after warm-up (MB) | slope (KB/round) | worker RSS (MB) | wall (s) '
    '| median round (s) |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    _summary_row('this run', s),
  ]
  if baseline is not None:
    lines.append(_summary_row(f'baseline (`{_BASELINE.value}`)', baseline['summary']))
  lines += [
    '',
    f'RSS of the Python process at start: {s["rss_start_mb"]:.1f} MB. Curve: '
    f'`{os.path.basename(result["plot"])}`.',
    '',
    '| round | RSS (MB) | worker RSS (MB) | seconds |',
    '|---:|---:|---:|---:|',
  ]
  for sample in result['samples']:
    if sample['round'] % 100 == 0 or sample is result['samples'][-1]:
      lines.append(
        f'| {sample["round"]} | {sample["rss_mb"]:.1f} | {_mb(sample["worker_rss_mb"])} '
        f'| {sample["seconds"]:.0f} |'
      )
  return '\n'.join(lines) + '\n'


def _mb(value: Optional[float]) -> str:
  return '-' if value is None else f'{value:.1f}'


def write_results(results: str, result: dict[str, Any], baseline: Optional[dict[str, Any]]) -> None:
  """Writes `<results>.{json,md,png}` (`result`: command, setting, samples) and prints a summary."""
  result['summary'] = summarize(result['samples'], _WARMUP.value)
  result['plot'] = results + '.png'
  write_plot(result['plot'], result, baseline)
  outputs.write_json(results + '.json', result)
  outputs.write_text(results + '.md', markdown(result, baseline))
  print(markdown(result, baseline).split('\n\n| round |')[0])


def main(argv: list[str]) -> None:
  del argv
  runtime.set_local_execution_context()  # Instead of TFF's default; its worker starts on use.
  results = _RESULTS.value
  baseline = outputs.read_json(_BASELINE.value) if _BASELINE.value else None
  if _REPORT_ONLY.value:
    write_results(results, outputs.read_json(results + '.json'), baseline)
    return
  config = experiment_config(_ROUNDS.value)
  setting = (
    f'mode {_MODE.value}; {config.dataset}, {config.num_clients} clients (iid), '
    f'{config.clients_per_round} per round, model {config.model}, aggregator '
    f'{config.aggregator}, batch {config.batch_size}, {config.local_epochs} local epoch(s)'
  )
  if _MODE.value == 'program':
    setting += f', evaluation every {config.eval_every} rounds on 500 examples'
  else:
    setting += ', datasets iterated in eager mode' if _ITERATE.value else ', datasets serialized'
  print(f'Running {config.rounds} rounds: {setting}.', flush=True)
  samples = run_program(config) if _MODE.value == 'program' else run_data(config)
  os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
  result = dict(
    command='python benchmarks/memory_growth.py'
    + ''.join(f' {shlex.quote(a)}' for a in sys.argv[1:]),
    setting=setting,
    samples=samples,
  )
  write_results(results, result, baseline)


if __name__ == '__main__':
  app.run(main)
