"""Accuracy against uploaded bits: clipq's defaults, the paper's settings, each ingredient, TFF.

For every (dataset, partition, payload, seed) this runs one study (`program.run_study`) of the
chosen method set, all on the same clients, client sampling and seed, and reports per method the
mean and standard deviation over seeds of the final test accuracy of the float global model and
of the quantized global model (its weights through the run's B-bit quantizer, as deployed).

Setting (the defaults issue's): the paper's CNN, 100 clients (IID, or Dirichlet(0.3) label
skew), 5 clients per round, 1 local epoch, batch 32, client SGD 0.01 with momentum 0.9, server
SGD 1.0; 20 rounds when clients upload updates, 10 when they upload weights (the quickstart's).

Method sets (`--methods`):
  * main (default, about an hour on 2 cores with the default grid): float32; clipq with its
    defaults (max_abs, stochastic, FedAvg weights, no QAT) at 1, 2 and 4 bits; clipq with the
    paper's settings (octav, stochastic, inverse-error weights, QAT) at 2 bits; tff_encoded (TFF's
    min-max quantizer) at 1 and 2 bits;
  * ablation: each ingredient switched on the defaults and off the paper's settings at 1 and 2
    bits, the mean-optimal threshold, the scale-free weighting, nearest rounding, per-channel
    thresholds and the Hadamard rotation;
  * broadcast: the defaults at 1 bit with the server's broadcast quantized (`--broadcast`): the
    model at 8 and 4 bits, its change since the clients' copy at 8, 4, 2 and 1 bits;
  * curve: 1, 2, 3, 4 bits and the paper's per-layer 4-2-2-4 for the defaults, the paper's
    settings and tff_encoded (4-2-2-4: clipq only);
  * subbit: below 1 bit per coordinate: float32, the defaults at 1 bit, the defaults at 1 bit
    sending a fraction 0.5, 0.25, 0.1 or 0.05 of each quantized tensor (`--sample_fraction`),
    the same budget as the last two spent on fewer entries at more bits (2 bits x 0.05, 3 bits x
    0.033), and tff_encoded at 1 bit.
  * frontier: accuracy from about 0.06 to 8 bits per coordinate, every tensor quantized (biases
    too, `min_size_to_quantize=0`): the defaults (max_abs) and the defaults with `octav`
    clipping at 1 bit on 5% and 25% of the entries and at 1, 2 and 8 bits; tff_encoded at 1, 2
    and 8 bits; float32.

  python benchmarks/accuracy_vs_bits.py
      [--methods=main|ablation|curve|broadcast|subbit|frontier]
      [--datasets=mnist,fashion_mnist] [--partitions=iid,dirichlet] [--payloads=update,weights]
      [--seeds=0,1,2] [--output_dir=runs/accuracy_vs_bits] [--resume]

Writes each study under output_dir/<methods>/<dataset>-<partition>-<payload>-seed<k>/ and the
combined table, goal verdicts and figure to `benchmarks/results/accuracy_vs_bits_<methods>.{md,
json,png}` (atomically, after every study, so an interrupted run leaves its completed part).
Data come from the runner's source chain (`--data_dir`, $TFF_CLIPQ_MNIST_DIR, ...).
"""

from __future__ import annotations

import collections
import datetime
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tff_clipq.experiments import config as config_lib  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import outputs  # pylint: disable=g-import-not-at-top
from tff_clipq.experiments import program  # pylint: disable=g-import-not-at-top

DEFAULTS = 'aggregator=clipq,clipping=max_abs,rounding=stochastic,weighting=example_count,qat=false'
PAPER = 'aggregator=clipq,clipping=octav,rounding=stochastic,weighting=inverse_error,qat=true'
FLOAT = 'aggregator=float,qat=false'
TFF_ENCODED = 'aggregator=tff_encoded,qat=false'


def _swap(base: str, **changes: str) -> str:
  """`base` with some of its `flag=value` overrides replaced (or added)."""
  items = collections.OrderedDict(item.split('=') for item in base.split(','))
  items.update(changes)
  return ','.join(f'{key}={value}' for key, value in items.items())


# (label, sweep overrides); a label names the method in every table and figure.
def _method_set(name: str) -> list[tuple[str, str]]:
  if name == 'main':
    return [
      ('float32', FLOAT),
      *((f'clipq defaults, {b} b', f'{DEFAULTS},bits={b}') for b in ('1', '2', '4')),
      ('clipq paper, 2 b', f'{PAPER},bits=2'),
      *((f'tff_encoded, {b} b', f'{TFF_ENCODED},bits={b}') for b in ('1', '2')),
    ]
  if name == 'ablation':
    methods = []
    for b in ('1', '2'):
      methods += [
        (f'clipq defaults, {b} b', f'{DEFAULTS},bits={b}'),
        (f'defaults + octav, {b} b', _swap(DEFAULTS, clipping='octav', bits=b)),
        (f'defaults + mean_optimal, {b} b', _swap(DEFAULTS, clipping='mean_optimal', bits=b)),
        (f'defaults + inverse_error, {b} b', _swap(DEFAULTS, weighting='inverse_error', bits=b)),
        (
          f'defaults + inverse_normalized_error, {b} b',
          _swap(DEFAULTS, weighting='inverse_normalized_error', bits=b),
        ),
        (f'defaults + QAT, {b} b', _swap(DEFAULTS, qat='true', bits=b)),
        (f'defaults + nearest, {b} b', _swap(DEFAULTS, rounding='nearest', bits=b)),
        (f'defaults + per_channel, {b} b', _swap(DEFAULTS, per_channel='true', bits=b)),
        (f'defaults + hadamard, {b} b', _swap(DEFAULTS, rotation='hadamard', bits=b)),
        (
          f'defaults + hadamard + octav, {b} b',
          _swap(DEFAULTS, rotation='hadamard', clipping='octav', bits=b),
        ),
        (f'clipq paper, {b} b', f'{PAPER},bits={b}'),
        (f'paper - QAT, {b} b', _swap(PAPER, qat='false', bits=b)),
        (f'paper - octav (max_abs), {b} b', _swap(PAPER, clipping='max_abs', bits=b)),
        (
          f'paper - inverse_error (FedAvg weights), {b} b',
          _swap(PAPER, weighting='example_count', bits=b),
        ),
      ]
    return [('float32', FLOAT)] + methods
  if name == 'broadcast':
    upload = f'{DEFAULTS},bits=1'
    return [
      ('float32', FLOAT),
      ('clipq defaults, 1 b', upload),
      *(
        (f'1 b + {mode} broadcast, {b} b', f'{upload},broadcast={mode},broadcast_bits={b}')
        for mode, widths in (('model', ('8', '4')), ('delta', ('8', '4', '2', '1')))
        for b in widths
      ),
    ]
  if name == 'curve':
    widths = ('1', '2', '3', '4', '4-2-2-4')
    return [
      ('float32', FLOAT),
      *((f'clipq defaults, {b} b', f'{DEFAULTS},bits={b}') for b in widths),
      *((f'clipq paper, {b} b', f'{PAPER},bits={b}') for b in widths),
      *((f'tff_encoded, {b} b', f'{TFF_ENCODED},bits={b}') for b in widths[:-1]),
    ]
  if name == 'subbit':
    return [
      ('float32', FLOAT),
      ('clipq defaults, 1 b', f'{DEFAULTS},bits=1'),
      *(
        (f'clipq defaults, 1 b, sample {f}', f'{DEFAULTS},bits=1,sample_fraction={f}')
        for f in SUBBIT_FRACTIONS
      ),
      *(
        (f'clipq defaults {b} b, sample {f}', f'{DEFAULTS},bits={b},sample_fraction={f}')
        for b, f in (('2', '0.05'), ('3', '0.033'))
      ),
      ('tff_encoded, 1 b', f'{TFF_ENCODED},bits=1'),
    ]
  if name == 'frontier':
    points = (('1', '0.05'), ('1', '0.25'), ('1', '1'), ('2', '1'), ('8', '1'))
    every_tensor = 'min_size_to_quantize=0'
    return [
      ('float32', FLOAT),
      *(
        (f'{family}, {b} b' + (f', sample {f}' if f != '1' else ''), overrides)
        for family, base in (
          ('clipq defaults', DEFAULTS),
          ('clipq octav', _swap(DEFAULTS, clipping='octav')),
        )
        for b, f in points
        for overrides in [f'{base},bits={b},sample_fraction={f},{every_tensor}']
      ),
      *((f'tff_encoded, {b} b', f'{TFF_ENCODED},bits={b},{every_tensor}') for b in ('1', '2', '8')),
    ]
  raise ValueError(f'--methods must be one of {", ".join(METHOD_SETS)}. Found {name!r}.')


METHOD_SETS = ('main', 'ablation', 'curve', 'broadcast', 'subbit', 'frontier')
# The fractions of each quantized tensor sent in the `subbit` set.
SUBBIT_FRACTIONS = ('0.5', '0.25', '0.1', '0.05')
# The sub-bit goal: within this many pp of float32 at <= this many bits per coordinate.
SUBBIT_GOAL_PP, SUBBIT_GOAL_BITS = 0.3, 0.25

_METHODS = flags.DEFINE_enum('methods', 'main', METHOD_SETS, 'Method set (module docstring).')
_DATASETS = flags.DEFINE_list('datasets', ['mnist', 'fashion_mnist'], 'Datasets.')
_PARTITIONS = flags.DEFINE_list('partitions', ['iid', 'dirichlet'], 'Partitions.')
_PAYLOADS = flags.DEFINE_list('payloads', ['update', 'weights'], 'What clients upload.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (one study each).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Dataset directory (else the source chain).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', 'runs/accuracy_vs_bits', 'Where studies go.')
_RESULTS = flags.DEFINE_string(
  'results',
  'benchmarks/results/accuracy_vs_bits',
  'Path prefix of the results; the method set is appended (accuracy_vs_bits_main.md, ...).',
)
_RESUME = flags.DEFINE_bool('resume', False, 'Continue interrupted studies.')
_REPORT_ONLY = flags.DEFINE_bool(
  'report_only',
  False,
  'Train nothing: rewrite the results from the summaries already in '
  '--output_dir (runs not found are left out).',
)
_ROUNDS = flags.DEFINE_integer(
  'rounds', 0, 'Rounds per run (0: 20 for update, 10 for weights).', lower_bound=0
)
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 100, 'Clients (5 per round).', lower_bound=5)

ROUNDS = {'update': 20, 'weights': 10}


def study_config(
  dataset: str, partition: str, payload: str, seed: int, methods: list[tuple[str, str]]
) -> config_lib.ExperimentConfig:
  """One (dataset, partition, payload, seed) study; the methods are its sweep."""
  rounds = _ROUNDS.value or ROUNDS[payload]
  return config_lib.ExperimentConfig(
    dataset=dataset,
    data_dir=_DATA_DIR.value,
    partition=partition,
    dirichlet_alpha=0.3,
    num_clients=_NUM_CLIENTS.value,
    clients_per_round=5,
    rounds=rounds,
    local_epochs=1,
    batch_size=32,
    client_learning_rate=0.01,
    client_momentum=0.9,
    server_learning_rate=1.0,
    model='cnn',
    payload=payload,
    seed=seed,
    eval_every=rounds,  # The final model only: the table reports final accuracy.
    output_dir=os.path.join(
      _OUTPUT_DIR.value, _METHODS.value, f'{dataset}-{partition}-{payload}-seed{seed}'
    ),
    resume=_RESUME.value,
    sweep='; '.join(overrides for _, overrides in methods),
  )


def setting_name(dataset: str, partition: str, payload: str) -> str:
  skew = 'Dirichlet(0.3)' if partition == 'dirichlet' else 'IID'
  return f'{dataset}, {skew}, {payload} payload ({_ROUNDS.value or ROUNDS[payload]} rounds)'


def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values))


def aggregate(
  runs: dict[str, dict[str, list[dict[str, Any]]]], labels: list[str]
) -> dict[str, list[dict[str, Any]]]:
  """Per setting and method: mean/std over seeds of the float and quantized model's accuracy."""
  table = collections.OrderedDict()
  for setting, by_label in runs.items():
    rows = []
    for label in labels:
      summaries = by_label.get(label, [])
      if not summaries:
        continue
      accuracy = _mean_std([s['final_test_accuracy'] for s in summaries])
      quantized = _mean_std([s.get('final_quantized_test_accuracy') for s in summaries])
      rows.append(
        dict(
          method=label,
          seeds=[s['config']['seed'] for s in summaries],
          accuracies=[s['final_test_accuracy'] for s in summaries],
          accuracy_mean=accuracy[0],
          accuracy_std=accuracy[1],
          quantized_accuracy_mean=quantized[0],
          quantized_accuracy_std=quantized[1],
          client_upload_bits=summaries[0]['client_upload_bits'],
          bits_per_coordinate=summaries[0]['bits_per_coordinate'],
          # Runs made before downloads were counted broadcast the float32 model.
          download_bits_per_coordinate=(
            summaries[0].get('client_download_bits', 0) / summaries[0]['num_parameters'] or 32.0
          ),
          wall_seconds=float(np.mean([s['wall_seconds'] for s in summaries])),
        )
      )
    table[setting] = rows
  return table


def _percent(mean: Optional[float], std: Optional[float]) -> str:
  return '-' if mean is None else f'{100 * mean:.1f} ± {100 * std:.1f}'


def markdown_tables(table: dict[str, list[dict[str, Any]]]) -> str:
  lines = []
  for setting, rows in table.items():
    reference = next((r['accuracy_mean'] for r in rows if r['method'] == 'float32'), None)
    lines += [
      f'### {setting}',
      '',
      '| method | bits / coordinate up | down | accuracy (%) | vs float32 (pp) '
      '| quantized model (%) | seeds | s / run |',
      '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
      delta = '-' if reference is None else f'{100 * (r["accuracy_mean"] - reference):+.1f}'
      lines.append(
        f'| {r["method"]} | {r["bits_per_coordinate"]:.3g} '
        f'| {r["download_bits_per_coordinate"]:.3g} '
        f'| {_percent(r["accuracy_mean"], r["accuracy_std"])} | {delta} '
        f'| {_percent(r["quantized_accuracy_mean"], r["quantized_accuracy_std"])} '
        f'| {len(r["seeds"])} | {r["wall_seconds"]:.0f} |'
      )
    lines.append('')
  return '\n'.join(lines)


def goal_verdicts(table: dict[str, list[dict[str, Any]]]) -> list[str]:
  """The defaults issue's goals, checked on the rows present (mean of seeds)."""
  verdicts = []
  for setting, rows in table.items():
    by_method = {r['method']: r['accuracy_mean'] for r in rows}
    reference = by_method.get('float32')
    if reference is None:
      continue
    verdicts += _subbit_verdicts(setting, rows, reference)
    iid, update = ', IID,' in setting, 'update payload' in setting
    for bits in ('1', '2'):
      ours = by_method.get(f'clipq defaults, {bits} b')
      # Goals: update payload at 1 and 2 bits (IID and Dirichlet); weights payload, IID, 2 bits.
      if ours is None or (not update and (bits == '1' or not iid)):
        continue
      gap = 100 * (reference - ours)
      allowed = 0.3 if (update and iid) else 1.0
      verdict = 'met' if gap <= allowed else 'missed'
      line = (
        f'{setting}, {bits} b: defaults {100 * ours:.1f}% vs float32 {100 * reference:.1f}%'
        f' (gap {gap:+.1f} pp, goal <= {allowed} pp): {verdict}'
      )
      tff = by_method.get(f'tff_encoded, {bits} b')
      if update and iid and tff is not None:
        margin = 100 * (ours - tff)
        line += (
          f'; vs tff_encoded {100 * tff:.1f}% (margin {margin:+.1f} pp, goal >= 1 pp): '
          f'{"met" if margin >= 1.0 else "missed"}'
        )
      verdicts.append(line)
  return verdicts


def _subbit_verdicts(setting: str, rows: list[dict[str, Any]], reference: float) -> list[str]:
  """The sub-bit goal, per sampled row: within 0.3 pp of float32 at <= 0.25 bits/coordinate.

  Args:
    setting: the setting's name.
    rows: its rows (`aggregate`).
    reference: float32's mean accuracy in it.
  """
  verdicts = []
  for r in rows:
    if ', sample ' not in r['method'] or r['bits_per_coordinate'] > SUBBIT_GOAL_BITS:
      continue
    gap = 100 * (reference - r['accuracy_mean'])
    verdicts.append(
      f'{setting}, {r["method"]} ({r["bits_per_coordinate"]:.3g} bits/coordinate): '
      f'{100 * r["accuracy_mean"]:.2f}% vs float32 {100 * reference:.2f}% (gap {gap:+.2f} pp, '
      f'goal <= {SUBBIT_GOAL_PP} pp at <= {SUBBIT_GOAL_BITS} bits/coordinate): '
      f'{"met" if gap <= SUBBIT_GOAL_PP else "missed"}'
    )
  return verdicts


FAMILIES = collections.OrderedDict(
  [
    ('float32', ('black', 's')),
    ('clipq defaults', ('tab:blue', 'o')),
    ('clipq paper', ('tab:red', 'v')),
    ('clipq octav', ('tab:orange', 'D')),
    ('tff_encoded', ('tab:green', '^')),
  ]
)


def write_figure(
  table: dict[str, list[dict[str, Any]]], path: str, per_coordinate: bool = False
) -> None:
  """Accuracy (mean ± std over seeds) against bits uploaded, one panel per setting.

  Args:
    table: `aggregate`'s rows per setting.
    path: the PNG to write.
    per_coordinate: bits per model coordinate on the x axis instead of bits per client.
  """
  x_key = 'bits_per_coordinate' if per_coordinate else 'client_upload_bits'
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  columns = min(len(table), 4)
  rows_count = -(-len(table) // columns)
  figure, axes = plt.subplots(
    rows_count, columns, figsize=(4.5 * columns, 3.6 * rows_count), squeeze=False
  )
  for panel, (setting, rows) in zip(axes.flat, table.items()):
    for family, (color, marker) in FAMILIES.items():
      points = [r for r in rows if r['method'] == family or r['method'].startswith(family + ',')]
      if not points:
        continue
      points.sort(key=lambda r: r[x_key])
      panel.errorbar(
        [r[x_key] for r in points],
        [100 * r['accuracy_mean'] for r in points],
        yerr=[100 * r['accuracy_std'] for r in points],
        color=color,
        marker=marker,
        capsize=2,
        label=family,
        linestyle='-' if len(points) > 1 else 'none',
      )
    others = [
      r
      for r in rows
      if not any(r['method'] == f or r['method'].startswith(f + ',') for f in FAMILIES)
    ]
    if others:
      panel.scatter(
        [r[x_key] for r in others],
        [100 * r['accuracy_mean'] for r in others],
        color='gray',
        marker='.',
        label='other clipq variants',
      )
    panel.set_xscale('log')
    panel.set_title(setting, fontsize=8)
    panel.set_xlabel(
      'bits uploaded per coordinate' if per_coordinate else 'bits uploaded per client per round',
      fontsize=8,
    )
    panel.set_ylabel('final test accuracy (%)', fontsize=8)
    panel.grid(alpha=0.3)
    panel.legend(fontsize='xx-small', loc='lower right')
  for panel in list(axes.flat)[len(table) :]:
    panel.set_visible(False)
  figure.tight_layout()
  try:
    with outputs.atomic_file(path, 'wb') as file:
      figure.savefig(file, format='png', dpi=110)
  finally:
    plt.close(figure)


def _commit() -> str:
  try:
    return subprocess.run(
      ['git', 'rev-parse', '--short', 'HEAD'],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def _stored_summaries(config: config_lib.ExperimentConfig) -> list[dict[str, Any]]:
  """The summaries of the study's runs already written under its output directory."""
  summaries = []
  for _, run_config in config.sweep_runs():
    path = os.path.join(run_config.output_dir, outputs.SUMMARY_JSON)
    if os.path.exists(path):
      summaries.append(outputs.read_json(path))
  return summaries


def main(argv: list[str]) -> None:
  del argv
  methods = _method_set(_METHODS.value)
  labels = [label for label, _ in methods]
  label_of = {
    config_lib.run_name(dict(item.split('=') for item in overrides.split(','))): label
    for label, overrides in methods
  }
  seeds = [int(s) for s in _SEEDS.value]
  prefix = f'{_RESULTS.value}_{_METHODS.value}'
  command = 'python benchmarks/accuracy_vs_bits.py' + ''.join(
    ' ' + shlex.quote(arg) for arg in sys.argv[1:]
  )
  runs: dict[str, dict[str, list[dict[str, Any]]]] = collections.OrderedDict()
  start = time.time()
  for dataset in _DATASETS.value:
    for partition in _PARTITIONS.value:
      for payload in _PAYLOADS.value:
        setting = setting_name(dataset, partition, payload)
        for seed in seeds:
          config = study_config(dataset, partition, payload, seed, methods)
          for summary in (
            _stored_summaries(config) if _REPORT_ONLY.value else program.run_study(config)
          ):
            runs.setdefault(setting, collections.OrderedDict()).setdefault(
              label_of[summary['run']], []
            ).append(summary)
          table = aggregate(runs, labels)
          verdicts = goal_verdicts(table)
          outputs.write_json(
            prefix + '.json', dict(command=command, commit=_commit(), table=table, goals=verdicts)
          )
          when = (
            'report of the runs stored in --output_dir (their time per run is in the table)'
            if _REPORT_ONLY.value
            else f'{(time.time() - start) / 60:.0f} min on this machine so far'
          )
          header = (
            f'# Accuracy vs uploaded bits: method set `{_METHODS.value}`\n\n'
            f'`{command}` at commit {_commit()}, {datetime.date.today().isoformat()}, '
            f'{when}. Final test accuracy '
            'of the float global model, mean ± std over seeds; "quantized model" is the same '
            "model with its weights through the run's B-bit quantizer (nearest rounding).\n\n"
          )
          goals = ''.join(f'- {line}\n' for line in verdicts)
          outputs.write_text(
            prefix + '.md',
            header + markdown_tables(table) + (f'\n## Goals\n\n{goals}' if goals else ''),
          )
          write_figure(table, prefix + '.png', per_coordinate=_METHODS.value == 'frontier')
          print(markdown_tables(table), flush=True)


if __name__ == '__main__':
  app.run(main)
