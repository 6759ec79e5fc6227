"""What a study leaves on disk besides metrics and checkpoints: summaries, tables, plots.

Every file is written atomically (a temporary file in the same directory, flushed to disk, then
`os.replace`d over the target), so a crash leaves either the previous version or the new one,
never a half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

SUMMARY_JSON = 'summary.json'
TABLE_MARKDOWN = 'comparison.md'
TABLE_CSV = 'comparison.csv'
ACCURACY_VS_ROUND_PNG = 'accuracy_vs_round.png'
ACCURACY_VS_BITS_PNG = 'accuracy_vs_bits.png'

TABLE_COLUMNS = (
  ('run', 'run'),
  ('method', 'method'),
  ('final_test_accuracy', 'final acc.'),
  ('best_test_accuracy', 'best acc.'),
  ('final_quantized_test_accuracy', 'quantized model acc.'),
  ('total_upload_bits', 'total upload bits'),
  ('compression_ratio', 'compression vs float32'),
  ('wall_seconds', 'wall time (s)'),
)


_FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'w') -> Iterator[io.IOBase]:
  """Yields a temporary file that replaces `path` when the block ends without an exception.

  Args:
    path: the file to write; missing parent directories are created.
    mode: the mode to open the temporary file in, e.g. 'w' (text) or 'wb' (binary).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, temp_path = tempfile.mkstemp(
    dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp'
  )
  try:
    with os.fdopen(fd, mode) as file:
      yield file
      file.flush()
      os.fsync(file.fileno())
    os.chmod(temp_path, _FILE_MODE)  # mkstemp creates 0600; outputs are ordinary files.
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temp_path)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically.

  Args:
    path: the file to write.
    text: its whole content.
  """
  with atomic_file(path) as file:
    file.write(text)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented, strict JSON (non-finite floats become null).

  Args:
    path: the file to write, atomically.
    value: a JSON-serializable value (dict keys are converted to strings).
  """
  with atomic_file(path) as file:
    json.dump(_finite_or_none(value), file, indent=2, allow_nan=False)
    file.write('\n')


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {str(k): _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  return value


def read_json(path: str) -> Any:
  with open(path) as file:
    return json.load(file)


def _format_cell(key: str, value: Any) -> str:
  if value is None:
    return '-'
  if key.endswith('accuracy'):
    return f'{value:.4f}'
  if key == 'total_upload_bits':
    return f'{value:.3e}'
  if key == 'compression_ratio':
    return f'{value:.2f}x'
  if key == 'wall_seconds':
    return f'{value:.1f}'
  return str(value)


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
  """One row per run: method, final/best test accuracy, upload bits, compression, wall time."""
  header = '| ' + ' | '.join(title for _, title in TABLE_COLUMNS) + ' |'
  rule = '|' + '|'.join('---' for _ in TABLE_COLUMNS) + '|'
  rows = [
    '| ' + ' | '.join(_format_cell(key, summary.get(key)) for key, _ in TABLE_COLUMNS) + ' |'
    for summary in summaries
  ]
  return '\n'.join([header, rule, *rows]) + '\n'


def write_comparison(directory: str, summaries: Sequence[dict[str, Any]]) -> None:
  """Writes the comparison table as markdown and as CSV (full precision) into `directory`.

  Args:
    directory: where `TABLE_MARKDOWN` and `TABLE_CSV` are written.
    summaries: one run summary per row, keyed by the names in `TABLE_COLUMNS`; a missing or
      None value shows as '-' in markdown and empty in CSV.
  """
  with atomic_file(os.path.join(directory, TABLE_MARKDOWN)) as file:
    file.write(markdown_table(summaries))
  with atomic_file(os.path.join(directory, TABLE_CSV)) as file:
    writer = csv.writer(file)
    writer.writerow([key for key, _ in TABLE_COLUMNS])
    for summary in summaries:
      writer.writerow(
        ['' if summary.get(key) is None else summary[key] for key, _ in TABLE_COLUMNS]
      )


def _legend_labels(summaries: Sequence[dict[str, Any]]) -> list[str]:
  """Method labels, or run names where two runs share a method label."""
  methods = [summary['method'] for summary in summaries]
  if len(set(methods)) == len(methods):
    return methods
  return [summary['run'] or summary['method'] for summary in summaries]


def _save_figure(figure: plt.Figure, path: str) -> None:
  try:
    with atomic_file(path, 'wb') as file:
      figure.savefig(file, format='png', dpi=120, bbox_inches='tight')
  finally:
    plt.close(figure)


def plot_title(summaries: Sequence[dict[str, Any]]) -> str:
  """What the runs share: dataset, partition, payload, clients, seed (from the first run)."""
  if not summaries:
    return ''
  config = summaries[0]['config']
  partition = config['partition']
  if partition == 'dirichlet':
    partition = f'Dirichlet({config["dirichlet_alpha"]:g})'
  return (
    f'{config["dataset"]}, {partition}, {config["payload"]} payload, '
    f'{config["clients_per_round"]} of {config["num_clients"]} clients per round, '
    f'seed {config["seed"]}'
  )


def write_plots(directory: str, summaries: Sequence[dict[str, Any]]) -> None:
  """Test accuracy vs round, and vs cumulative uploaded bits (log x), one line per run.

  Args:
    directory: where `ACCURACY_VS_ROUND_PNG` and `ACCURACY_VS_BITS_PNG` are written.
    summaries: one run summary per line, with 'method', 'run' and 'history' (rows with
      'round', 'cumulative_upload_bits' and 'test_accuracy'); the first one's 'config' gives
      the title (`plot_title`).
  """
  labels = _legend_labels(summaries)
  title = plot_title(summaries)
  evaluated = [
    [row for row in summary['history'] if row.get('test_accuracy') is not None]
    for summary in summaries
  ]
  for x_key, x_label, file_name, log_x in (
    ('round', 'round', ACCURACY_VS_ROUND_PNG, False),
    (
      'cumulative_upload_bits',
      'cumulative uploaded bits (all clients)',
      ACCURACY_VS_BITS_PNG,
      True,
    ),
  ):
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in zip(labels, evaluated):
      axes.plot(
        [row[x_key] for row in rows],
        [row['test_accuracy'] for row in rows],
        marker='o',
        markersize=3,
        label=label,
      )
    if log_x:
      axes.set_xscale('log')
    axes.set_xlabel(x_label)
    axes.set_ylabel('test accuracy')
    axes.set_title(title, fontsize=8)
    axes.grid(True, alpha=0.3)
    # Beside the axes, so that many runs never hide the curves.
    axes.legend(fontsize='x-small', loc='center left', bbox_to_anchor=(1.02, 0.5))
    _save_figure(figure, os.path.join(directory, file_name))
