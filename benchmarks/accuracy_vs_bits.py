"""Accuracy vs communication: the paper's MNIST study and the baselines, on the same clients.

For every (dataset, partition, seed) setting this runs one study (`tff_clipq.experiments.program.
run_study`) of the methods below, all on the same clients, client sampling and seed:

  * float32 FedAvg (`tff.aggregators.MeanFactory`);
  * clipq (octav clipping, inverse-error weighting, QAT) with nearest and with stochastic rounding
    at 1, 2, 3, 4 and 8 bits, and at the paper's per-layer 4-2-2-4;
  * clipq at 2 bits, stochastic, with FedAvg (example-count) weighting instead;
  * clipq at 2 bits, stochastic, without QAT;
  * conventional max_abs (unclipped) quantization at 2 bits, nearest and stochastic (with QAT);
  * TFF's built-in min-max stochastic quantization (`EncodedSumFactory.quantize_above_threshold`)
    at 1, 2 and 4 bits.

Clients upload their trained weights (the paper's setting), so quantization error enters the
model itself. Settings: MNIST and Fashion-MNIST (60k/10k), IID and Dirichlet(0.3) label skew.
The default size finishes in under an hour on 2 CPU cores; `--full` runs the full-size version
(more rounds, more clients per round, three seeds).

  python benchmarks/accuracy_vs_bits.py [--full] [--datasets=mnist,fashion_mnist]
      [--partitions=iid,dirichlet] [--output_dir=runs/accuracy_vs_bits]
      [--qat_threshold_refresh_steps=0] [--methods='<sweep>' --results=<prefix>]

`--methods` replaces the study's methods (an ablation, say); docs/results.md gives the command of
the ablation it reports.

Writes each study under output_dir/<dataset>-<partition>-seed<k>/ (CSV, JSON, plots), and the
combined tables to `benchmarks/results/accuracy_vs_bits.{md,json}` (atomically).
"""

from __future__ import annotations

import collections
import os
import shlex
import sys
import time
from typing import Any

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tff_clipq.experiments import config as config_lib  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import outputs  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import program  # pylint: disable=g-import-not-at-top

_FULL = flags.DEFINE_bool('full', False, 'Full-size study: 30 rounds, 10 clients/round, 3 seeds.')
_DATASETS = flags.DEFINE_list('datasets', ['mnist', 'fashion_mnist'], 'Datasets to run.')
_PARTITIONS = flags.DEFINE_list('partitions', ['iid', 'dirichlet'], 'Partitions to run.')
_SEEDS = flags.DEFINE_list('seeds', None, 'Seeds (default: 0; with --full: 0,1,2).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'runs/accuracy_vs_bits', 'Where studies go.')
_RESULTS = flags.DEFINE_string(
    'results', 'benchmarks/results/accuracy_vs_bits', 'Path prefix of the combined .md/.json.'
)
_RESUME = flags.DEFINE_bool('resume', False, 'Continue interrupted studies.')
_METHODS = flags.DEFINE_string(
    'methods', None,
    "Methods to run instead of the study's, as a `--sweep` string ('; '-separated settings), "
    'e.g. for an ablation; use with its own --output_dir and --results.',
)
_QAT_REFRESH = flags.DEFINE_integer(
    'qat_threshold_refresh_steps', config_lib.ExperimentConfig.qat_threshold_refresh_steps,
    'QAT threshold recomputation every this many local steps (0: once per client round, the '
    'default, as in the table in docs/results.md).', lower_bound=0,
)

CLIPQ = 'aggregator=clipq,clipping=octav,weighting=inverse_error,qat=true'
METHODS = [
    'aggregator=float,qat=false',
    *(f'{CLIPQ},bits={bits},rounding={rounding}'
      for bits in ('1', '2', '3', '4', '8', '4-2-2-4') for rounding in ('nearest', 'stochastic')),
    'aggregator=clipq,clipping=octav,weighting=example_count,qat=true,bits=2,rounding=stochastic',
    'aggregator=clipq,clipping=octav,weighting=inverse_error,qat=false,bits=2,rounding=stochastic',
    *(f'aggregator=clipq,clipping=max_abs,weighting=inverse_error,qat=true,bits=2,rounding={r}'
      for r in ('nearest', 'stochastic')),
    *(f'aggregator=tff_encoded,qat=false,bits={bits}' for bits in ('1', '2', '4')),
]


def study_config(dataset: str, partition: str, seed: int, full: bool) -> config_lib.ExperimentConfig:
  """The base settings of one study; the methods are its sweep."""
  return config_lib.ExperimentConfig(
      dataset=dataset,
      partition=partition,
      dirichlet_alpha=0.3,
      num_clients=100,
      clients_per_round=10 if full else 5,
      rounds=30 if full else 10,
      local_epochs=1,
      batch_size=32,
      client_learning_rate=0.01,
      client_momentum=0.9,
      model='cnn',
      payload='weights',
      qat_threshold_refresh_steps=_QAT_REFRESH.value,
      seed=seed,
      eval_every=1,
      max_eval_examples=0 if full else 5000,
      output_dir=os.path.join(_OUTPUT_DIR.value, f'{dataset}-{partition}-seed{seed}'),
      resume=_RESUME.value,
      sweep=_METHODS.value or '; '.join(METHODS),
  )


def _method_key(summary: dict[str, Any]) -> str:
  config = summary['config']
  if config['aggregator'] == 'float':
    return 'float32'
  if config['aggregator'] == 'tff_encoded':
    return f"TFF min-max stochastic, {config['bits']} b"
  parts = [f"{config['clipping']}", config['rounding'], f"{config['bits']} b"]
  if config['weighting'] != 'inverse_error':
    parts.append(f"{config['weighting']} weights")
  if not config['qat']:
    parts.append('no QAT')
  return 'clipq ' + ', '.join(parts)


def combined_table(studies: dict[str, list[dict[str, Any]]]) -> str:
  """One markdown table per setting: final/best accuracy, upload, compression, time."""
  lines = []
  for setting, summaries in studies.items():
    lines += [f'### {setting}', '',
              '| method | final acc. | best acc. | upload per client (bits) | total upload (Mbit) '
              '| compression vs float32 | wall time (s) |',
              '|---|---:|---:|---:|---:|---:|---:|']
    for summary in summaries:
      lines.append(
          f"| {_method_key(summary)} | {summary['final_test_accuracy']:.4f} "
          f"| {summary['best_test_accuracy']:.4f} | {summary['client_upload_bits']:,} "
          f"| {summary['total_upload_bits'] / 1e6:.2f} | {summary['compression_ratio']:.1f} "
          f"| {summary['wall_seconds']:.0f} |"
      )
    lines.append('')
  return '\n'.join(lines)


def write_plot(studies: dict[str, list[dict[str, Any]]], path: str) -> None:
  """Final test accuracy vs bits uploaded per client and round, one panel per setting."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  families = collections.OrderedDict([
      ('float32', ('black', 's')),
      ('clipq octav, nearest', ('tab:red', 'v')),
      ('clipq octav, stochastic', ('tab:blue', 'o')),
      ('clipq max_abs', ('tab:orange', 'D')),
      ('TFF min-max stochastic', ('tab:green', '^')),
  ])
  figure, axes = plt.subplots(
      1, len(studies), figsize=(5 * len(studies), 4), squeeze=False, sharey=True
  )
  for panel, (setting, summaries) in zip(axes[0], studies.items()):
    for family, (color, marker) in families.items():
      points = [
          (s['client_upload_bits'], s['final_test_accuracy'], _method_key(s))
          for s in summaries if _method_key(s).startswith(family)
      ]
      if points:
        panel.scatter([p[0] for p in points], [p[1] for p in points], color=color,
                      marker=marker, label=family)
        for bits, accuracy, key in points:
          note = key[len(family):].strip(', ')
          if note:
            panel.annotate(note, (bits, accuracy), fontsize=6, xytext=(3, 2),
                           textcoords='offset points')
    panel.set_xscale('log')
    panel.set_title(setting, fontsize=9)
    panel.set_xlabel('bits uploaded per client per round')
    panel.grid(alpha=0.3)
  axes[0][0].set_ylabel('final test accuracy')
  axes[0][-1].legend(fontsize='x-small', loc='lower right')
  try:
    with outputs.atomic_file(path, 'wb') as file:
      figure.savefig(file, format='png', dpi=110, bbox_inches='tight')
  finally:
    plt.close(figure)


def main(argv: list[str]) -> None:
  del argv
  seeds = [int(s) for s in (_SEEDS.value or (['0', '1', '2'] if _FULL.value else ['0']))]
  studies: dict[str, list[dict[str, Any]]] = collections.OrderedDict()
  start = time.time()
  command_flags = ''.join(' ' + shlex.quote(arg) for arg in sys.argv[1:])
  for dataset in _DATASETS.value:
    for partition in _PARTITIONS.value:
      for seed in seeds:
        config = study_config(dataset, partition, seed, _FULL.value)
        name = f'{dataset}, {partition}' + (', Dirichlet alpha 0.3' if partition == 'dirichlet' else '') + f', seed {seed}'
        studies[name] = program.run_study(config)
        outputs.write_json(_RESULTS.value + '.json', {
            setting: [{k: v for k, v in s.items() if k != 'history'} for s in summaries]
            for setting, summaries in studies.items()
        })
        table = combined_table(studies)
        with outputs.atomic_file(_RESULTS.value + '.md') as f:
          f.write('# Accuracy vs uploaded bits\n\n'
                  f'Generated by `python benchmarks/accuracy_vs_bits.py{command_flags}` '
                  f'({(time.time() - start) / 60:.0f} min so far on this machine).\n\n' + table)
        write_plot(studies, _RESULTS.value + '.png')
        print(table, flush=True)


if __name__ == '__main__':
  app.run(main)
