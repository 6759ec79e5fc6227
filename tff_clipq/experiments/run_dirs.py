"""A study's output directory: the --resume/--overwrite checks, settings files, checkpoints.

`check_output_dir` only reads (every check passes before anything is written);
`prepare_output_dir` applies --overwrite and writes `study.json` and each run's `config.json`;
`Checkpoints` saves (round, learning-process state, metrics history) after every round through
`tff.program.FileProgramStateManager`, which `--resume` restores.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import re
import shutil
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import outputs

STUDY_JSON = 'study.json'
CONFIG_JSON = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
CHECKPOINT_PREFIX = 'program_state_'
# Leftovers of an interrupted atomic write by TFF's file managers ('<name>_temp1234').
_TFF_TEMPORARY = re.compile(r'.*_temp\d+$')

ConfigError = config_lib.ConfigError


def config_dict(config: config_lib.ExperimentConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))  # Tuples as lists, as read back.


def completed_rounds(run_dir: str) -> int:
  """The round of the latest checkpoint in `run_dir` (0 if none)."""
  manager = tff.program.FileProgramStateManager(
    os.path.join(run_dir, CHECKPOINT_DIR), prefix=CHECKPOINT_PREFIX
  )
  return max(asyncio.run(manager.get_versions()) or [0])


def check_output_dir(
  config: config_lib.ExperimentConfig, runs: list[tuple[str, config_lib.ExperimentConfig]]
) -> None:
  """Checks `output_dir` against --resume/--overwrite; changes nothing on disk.

  Args:
    config: the study's settings.
    runs: (name, settings) of each run; `output_dir` of each is the run's directory.

  Raises:
    ConfigError: the directory holds something else, or runs that cannot continue as set.
  """
  root = config.output_dir
  if os.path.isdir(root) and os.listdir(root):
    if not os.path.exists(os.path.join(root, STUDY_JSON)):
      raise ConfigError(
        f'--output_dir={root} is not empty and has no {STUDY_JSON}, so it was not written by '
        'this program; choose another --output_dir.'
      )
    if not (config.overwrite or config.resume):
      raise ConfigError(
        f'--output_dir={root} already holds runs. Pass --resume to continue them from their '
        'checkpoints, --overwrite to delete them, or choose another --output_dir.'
      )
  if not config.overwrite:
    for name, run_config in runs:
      _check_resumable(name, run_config)


def prepare_output_dir(
  config: config_lib.ExperimentConfig, runs: list[tuple[str, config_lib.ExperimentConfig]]
) -> None:
  """Applies --overwrite and writes the settings files (after every check has passed).

  Args:
    config: the study's settings (written to `study.json`).
    runs: (name, settings) of each run (each written to its directory's `config.json`).
  """
  root = config.output_dir
  if config.overwrite and os.path.isdir(root):
    shutil.rmtree(root)
  outputs.write_json(os.path.join(root, STUDY_JSON), config_dict(config))
  for _, run_config in runs:
    path = os.path.join(run_config.output_dir, CONFIG_JSON)
    outputs.write_json(path, config_dict(run_config))


def _check_resumable(name: str, run_config: config_lib.ExperimentConfig) -> None:
  """Raises ConfigError unless the run already in `run_config.output_dir` can continue as set."""
  run_dir = run_config.output_dir
  config_path = os.path.join(run_dir, CONFIG_JSON)
  if not os.path.exists(config_path):
    return
  stored, current = outputs.read_json(config_path), config_dict(run_config)
  # A setting added after the run was started is absent from its config: it ran with the default.
  defaults = config_dict(config_lib.ExperimentConfig())
  stored = {key: stored.get(key, defaults[key]) for key in current}
  changed = [
    f'--{key}={stored[key]!r} (now {value!r})'
    for key, value in current.items()
    if key not in config_lib.RESUMABLE_CHANGES and stored[key] != value
  ]
  run_label = f'run {name!r}'
  if changed:
    raise ConfigError(
      f'--resume: {run_label} in {run_dir} was started with other settings: '
      f'{", ".join(changed)}. Resume with the original flags, or use another --output_dir.'
    )
  completed = completed_rounds(run_dir)
  if completed > run_config.rounds:
    raise ConfigError(
      f'--rounds={run_config.rounds} is below the {completed} rounds {run_label} in '
      f'{run_dir} already completed.'
    )


def remove_interrupted_writes(run_dir: str) -> None:
  """Deletes temporaries that a crash during an atomic write by TFF's managers left behind."""
  for directory in (run_dir, os.path.join(run_dir, CHECKPOINT_DIR)):
    if os.path.isdir(directory):
      for entry in os.listdir(directory):
        if _TFF_TEMPORARY.match(entry):
          path = os.path.join(directory, entry)
          shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


class Checkpoints:
  """Saves and restores (round, learning-process state, metrics history) after each round.

  The state is stored as its flattened list of arrays and rebuilt with the structure of a fresh
  `initialize()`, since the SavedModel format of `tff.program.FileProgramStateManager` keeps the
  values but not TFF's structure classes; the history is one JSON string.

  Args:
    run_dir: the run's directory (checkpoints go to its `checkpoints/`).
    initial_state: the learning process's `initialize()`, the structure to restore into.
  """

  def __init__(self, run_dir: str, initial_state: Any):
    self._manager = tff.program.FileProgramStateManager(
      os.path.join(run_dir, CHECKPOINT_DIR),
      prefix=CHECKPOINT_PREFIX,
      keep_total=2,
      keep_first=False,
    )
    self._initial_state = initial_state

  def _program_state(self, round_num: int, state: Any, history: list[dict[str, Any]]):
    return collections.OrderedDict(
      round=np.int64(round_num),
      state=[np.asarray(leaf) for leaf in tf.nest.flatten(state)],
      history=json.dumps(history),
    )

  def save(self, round_num: int, state: Any, history: list[dict[str, Any]]) -> None:
    """Saves the state after round `round_num` (keeping the last two versions).

    Args:
      round_num: the round just completed.
      state: the learning process's state.
      history: the metrics of every round so far.
    """
    asyncio.run(self._manager.save(self._program_state(round_num, state, history), round_num))

  def load_latest(self) -> tuple[int, Any, list[dict[str, Any]]]:
    """(round, state, history) of the latest checkpoint, or (0, initial state, []) if none."""
    structure = self._program_state(0, self._initial_state, [])
    saved, round_num = asyncio.run(self._manager.load_latest(structure))
    if saved is None:
      return 0, self._initial_state, []
    leaves = [
      np.asarray(value, dtype=np.asarray(template).dtype)
      for value, template in zip(saved['state'], structure['state'])
    ]
    history = saved['history']
    history = json.loads(history.decode() if isinstance(history, bytes) else history)
    return round_num, tf.nest.pack_sequence_as(self._initial_state, leaves), history
