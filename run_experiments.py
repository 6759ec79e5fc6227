"""Federated learning with clipped uniform quantization: one experiment or a sweep.

  python run_experiments.py --flagfile=configs/quickstart.cfg
  python run_experiments.py --dataset=mnist --aggregator=clipq --bits=2 --output_dir=runs/mine
  python run_experiments.py --flagfile=configs/quickstart.cfg --resume   # after an interruption

Writes metrics, checkpoints, summaries, a comparison table and plots to --output_dir and prints
the table. Exit status: 0 done; 1 failed (data source or TFF worker problem, explained in one
line; rerun with --resume to continue); 2 invalid flags.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF's C++ INFO/WARNING lines; errors stay.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from tff_clipq import data as data_lib
from tff_clipq import runtime
from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import flag_definitions
from tff_clipq.experiments import outputs
from tff_clipq.experiments import program

flag_definitions.define_flags()
flags.adopt_module_key_flags(config_lib)  # --help lists them.

FAILURE = 1
USAGE_ERROR = 2


def _exit_with_error(message: str, status: int) -> None:
  sys.stderr.write(f'run_experiments.py: error: {message}\n')
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad flag exits with status 2 (usage error) and one line."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with_error(f'{e}\nPass --help to see the flags.', USAGE_ERROR)
  if flags.FLAGS['verbosity'].using_default_value:
    flags.FLAGS.verbosity = -1  # WARNING: keep per-round INFO logs of TFF off the terminal.
  return remaining


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _exit_with_error(f'unexpected arguments {argv[1:]}; all settings are --flags.', USAGE_ERROR)
  try:
    config = config_lib.ExperimentConfig.from_flags()
    summaries = program.run_study(config)
  except config_lib.ConfigError as e:
    _exit_with_error(str(e), USAGE_ERROR)
  except data_lib.DataSourceError as e:
    _exit_with_error(str(e), FAILURE)
  except (runtime.WorkerUnavailableError, runtime.WorkerStartError) as e:
    _exit_with_error(
      f'{e} Rounds completed so far are checkpointed in {config.output_dir}; rerun the same '
      'command with --resume to continue.',
      FAILURE,
    )
  print(outputs.markdown_table(summaries))
  print(f'Outputs (metrics.csv, summary.json, tensorboard/, plots) in {config.output_dir}')


if __name__ == '__main__':
  # Replace TFF's default context, whose worker could outlive this process (see runtime.py), also
  # before exits on bad flags: its clean-up at interpreter shutdown prints a spurious traceback.
  runtime.set_local_execution_context()
  app.run(main, flags_parser=_parse_flags)
