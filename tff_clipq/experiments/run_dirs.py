"""A study's output directory: the --resume/--overwrite checks, settings files, checkpoints.

`check_output_dir` only reads (every check passes before anything is written);
`prepare_output_dir` applies --overwrite and writes `study.json` and each run's `config.json`;
`Checkpoints` saves (round, learning-process state, metrics history, per-client state) after every
round as one `.npz` file written atomically, which `--resume` restores.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from tff_clipq.experiments import config as config_lib
from tff_clipq.experiments import outputs

STUDY_JSON = 'study.json'
CONFIG_JSON = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
_CHECKPOINT_FILE = re.compile(r'^round_(\d+)\.npz$')
# The arrays of client k in a checkpoint: 'client_<k>_<i>'.
_CLIENT_ARRAY = re.compile(r'^client_(\d+)_\d+$')
# Leftovers of an interrupted atomic write: TFF's file managers ('<name>_temp1234') and
# `outputs.atomic_file` ('.<name>.<random>.tmp').
_TEMPORARY = re.compile(r'(.*_temp\d+|\..*\.tmp)$')

ConfigError = config_lib.ConfigError


def config_dict(config: config_lib.ExperimentConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))  # Tuples as lists, as read back.


def checkpoint_path(run_dir: str, round_num: int) -> str:
  """The file that holds the checkpoint after round `round_num` of the run in `run_dir`.

  Args:
    run_dir: the run's directory.
    round_num: the round the checkpoint was taken after.
  """
  return os.path.join(run_dir, CHECKPOINT_DIR, f'round_{round_num:06d}.npz')


def _checkpoint_rounds(run_dir: str) -> list[int]:
  directory = os.path.join(run_dir, CHECKPOINT_DIR)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(m.group(1)) for m in map(_CHECKPOINT_FILE.match, names) if m)


def completed_rounds(run_dir: str) -> int:
  """The round of the latest checkpoint in `run_dir` (0 if none)."""
  return max(_checkpoint_rounds(run_dir) or [0])


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
  checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
  if os.path.isdir(checkpoint_dir) and any(
    name.startswith('program_state_') for name in os.listdir(checkpoint_dir)
  ):
    raise ConfigError(
      f'--resume: {run_label} in {run_dir} has checkpoints in the SavedModel format of an '
      'earlier tff_clipq, which this version does not read; rerun it with --overwrite.'
    )
  completed = completed_rounds(run_dir)
  if completed > run_config.rounds:
    raise ConfigError(
      f'--rounds={run_config.rounds} is below the {completed} rounds {run_label} in '
      f'{run_dir} already completed.'
    )


def remove_interrupted_writes(run_dir: str) -> None:
  """Deletes temporaries that a crash during an atomic write left behind."""
  for directory in (run_dir, os.path.join(run_dir, CHECKPOINT_DIR)):
    if os.path.isdir(directory):
      for entry in os.listdir(directory):
        if _TEMPORARY.match(entry):
          path = os.path.join(directory, entry)
          shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


class Checkpoints:
  """Saves and restores (round, learning-process state, metrics history, client states).

  Each checkpoint is one `.npz` file: the state's flattened arrays (`state_0`, `state_1`, ...),
  rebuilt on load with the structure of a fresh `initialize()`, the round and the history as one
  JSON string, and the states the program keeps per client (error feedback's residuals) as
  `client_<k>_<i>` with the client ids in order as one JSON string. It is written through `outputs.atomic_file`, so a crash leaves the previous
  checkpoint intact; the last two are kept. A plain file per round keeps a long run's memory flat,
  where a SavedModel per round (`tff.program.FileProgramStateManager`) grew it ~41 KB per round.

  Args:
    run_dir: the run's directory (checkpoints go to its `checkpoints/`).
    initial_state: the learning process's `initialize()`, the structure to restore into.
  """

  _KEEP = 2

  def __init__(self, run_dir: str, initial_state: Any):
    self._run_dir = run_dir
    self._initial_state = initial_state

  def save(
    self,
    round_num: int,
    state: Any,
    history: list[dict[str, Any]],
    client_states: Optional[dict[str, list[np.ndarray]]] = None,
  ) -> None:
    """Saves the state after round `round_num` (keeping the last two checkpoints).

    Args:
      round_num: the round just completed.
      state: the learning process's state.
      history: the metrics of every round so far.
      client_states: the arrays the program keeps per client id, if any.
    """
    arrays = {f'state_{i}': np.asarray(leaf) for i, leaf in enumerate(tf.nest.flatten(state))}
    client_states = client_states or {}
    for k, arrays_of_client in enumerate(client_states.values()):
      arrays.update((f'client_{k}_{i}', np.asarray(a)) for i, a in enumerate(arrays_of_client))
    with outputs.atomic_file(checkpoint_path(self._run_dir, round_num), 'wb') as file:
      np.savez(
        file,
        round=np.int64(round_num),
        history=np.str_(json.dumps(history)),
        client_ids=np.str_(json.dumps(list(client_states))),
        **arrays,
      )
    for old in _checkpoint_rounds(self._run_dir)[: -self._KEEP]:
      os.remove(checkpoint_path(self._run_dir, old))

  def load_latest(self) -> tuple[int, Any, list[dict[str, Any]], dict[str, list[np.ndarray]]]:
    """(round, state, history, client states) of the latest checkpoint, or
    (0, initial state, [], {}) if none."""
    round_num = completed_rounds(self._run_dir)
    if not round_num:
      return 0, self._initial_state, [], {}
    templates = tf.nest.flatten(self._initial_state)
    with np.load(checkpoint_path(self._run_dir, round_num)) as saved:
      leaves = [
        np.asarray(saved[f'state_{i}'], dtype=np.asarray(template).dtype)
        for i, template in enumerate(templates)
      ]
      history = json.loads(str(saved['history']))
      client_ids = json.loads(str(saved['client_ids']))
      counts = collections.Counter(
        int(match.group(1)) for match in map(_CLIENT_ARRAY.match, saved.files) if match
      )
      client_states = {
        client_id: [saved[f'client_{k}_{i}'] for i in range(counts[k])]
        for k, client_id in enumerate(client_ids)
      }
    state = tf.nest.pack_sequence_as(self._initial_state, leaves)
    return round_num, state, history, client_states
