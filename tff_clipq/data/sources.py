"""Centralized image datasets as numpy arrays, loaded offline whenever the data is on disk.

`load_array_dataset` returns an `ArrayDataset` (uint8 images, int64 labels, train and test splits)
for `mnist`, `fashion_mnist`, `digits` (scikit-learn's bundled 8x8 digits) and `synthetic`
(generated from the seed). MNIST and Fashion-MNIST are looked up, first hit wins, in:

1. the `data_dir` argument;
2. the environment variable `TFF_CLIPQ_MNIST_DIR` resp. `TFF_CLIPQ_FASHION_MNIST_DIR`;
3. the Keras cache (`~/.keras/datasets/mnist.npz`, `~/.keras/datasets/fashion-mnist/`);
4. well-known local installs: `/usr/share/datasets/fashion-mnist` (Debian's dataset-fashion-mnist)
   and a `shared/data/<name>` folder beside the checkout (this project's offline machines);
5. a download through `tf.keras.datasets.<name>.load_data()`.

An explicit source (1 or 2) that is missing or unusable raises at once rather than silently
falling back to another copy of the data. When nothing works, a `DataSourceError` lists every
place tried and why it failed.

A directory holds either the four IDX files of the original distribution (`train-images-idx3-ubyte`,
`train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or `.gz`),
or an `.npz` with keys `x_train`, `y_train`, `x_test`, `y_test` (Keras' `mnist.npz` layout). A
directory with only the two t10k files is a valid, announced source: its 10,000 images are split
into a training pool and a held-out evaluation set (see `_split_test_only`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zipfile
import zlib
from typing import Optional

from absl import logging
import numpy as np

from tff_clipq.data import generated

ARRAY_DATASET_NAMES = ('mnist', 'fashion_mnist', 'digits', 'synthetic')

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_IMAGE_SHAPE = generated.MNIST_IMAGE_SHAPE
MNIST_NUM_CLASSES = 10

# Fraction of a test-split-only source (and of scikit-learn's digits) held out for evaluation.
EVALUATION_FRACTION = 0.2

ENV_VARS = {'mnist': 'TFF_CLIPQ_MNIST_DIR', 'fashion_mnist': 'TFF_CLIPQ_FASHION_MNIST_DIR'}
# Paths relative to the user's home directory where `tf.keras.datasets` caches its downloads.
KERAS_CACHE_PATHS = {
  'mnist': os.path.join('.keras', 'datasets', 'mnist.npz'),
  'fashion_mnist': os.path.join('.keras', 'datasets', 'fashion-mnist'),
}
# A `shared/data/<name>` folder beside the checkout: how this project's offline development and CI
# machines provide the data (used only when it exists).
_CHECKOUT_SIBLING_DATA = os.path.normpath(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data')
)
SYSTEM_DIRS = {
  'mnist': (os.path.join(_CHECKOUT_SIBLING_DATA, 'mnist'),),
  'fashion_mnist': (
    '/usr/share/datasets/fashion-mnist',
    os.path.join(_CHECKOUT_SIBLING_DATA, 'fashion_mnist'),
  ),
}

# The four IDX files of the MNIST distribution, keyed by role; each may also use a dot instead of
# the dash before `idx` (as some archive tools extract them) and may be gzip-compressed.
IDX_FILE_STEMS = {
  'train_images': 'train-images-idx3-ubyte',
  'train_labels': 'train-labels-idx1-ubyte',
  'test_images': 't10k-images-idx3-ubyte',
  'test_labels': 't10k-labels-idx1-ubyte',
}


class DataSourceError(ValueError):
  """A dataset could not be found or read; the message names the files and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """A centralized image classification dataset held in memory.

  Attributes:
    name: The dataset name, one of `ARRAY_DATASET_NAMES`.
    train_images: uint8 array [N, H, W], 0 is background.
    train_labels: int64 array [N] with values in [0, num_classes).
    test_images: uint8 array [M, H, W], held out for centralized evaluation.
    test_labels: int64 array [M].
    num_classes: Number of label classes.
    source: Where the data came from (paths, download, generator) and how it was split.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str


@dataclasses.dataclass(frozen=True)
class _Splits:
  """The four arrays read from one source, and a description of that source."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str


def load_array_dataset(name: str, data_dir: Optional[str] = None, seed: int = 0) -> ArrayDataset:
  """Loads dataset `name` (one of `ARRAY_DATASET_NAMES`) into memory.

  Args:
    name: `mnist`, `fashion_mnist`, `digits` or `synthetic`.
    data_dir: For `mnist`/`fashion_mnist`, a directory (or `.npz` file) to load from; it must
      exist and hold the data. Not allowed for `digits` and `synthetic`, which need no files.
    seed: Seeds the train/evaluation split of test-split-only sources and of `digits`, and the
      generator of `synthetic`.

  Returns:
    An `ArrayDataset`.

  Raises:
    ValueError: If `name` is unknown, or `data_dir` is given for a dataset without files.
    DataSourceError: If no source holds usable data (the message lists each place tried).
  """
  if name not in ARRAY_DATASET_NAMES:
    raise ValueError(f'`name` must be one of {ARRAY_DATASET_NAMES}. Found {name!r}.')
  if name in ('digits', 'synthetic'):
    if data_dir is not None:
      raise ValueError(f'`data_dir` is not used by the {name!r} dataset. Found {data_dir!r}.')
    if name == 'digits':
      splits = generated.digits(seed, EVALUATION_FRACTION)
    else:
      splits = generated.synthetic(seed)
    return ArrayDataset(name=name, **splits._asdict())
  splits = _resolve_mnist_like(name, data_dir, seed)
  logging.info('Loaded %s: %s', name, splits.source)
  return ArrayDataset(
    name=name,
    train_images=splits.train_images,
    train_labels=splits.train_labels,
    test_images=splits.test_images,
    test_labels=splits.test_labels,
    num_classes=MNIST_NUM_CLASSES,
    source=splits.source,
  )


def _resolve_mnist_like(name: str, data_dir: Optional[str], seed: int) -> _Splits:
  """Tries the sources of `name` in order; explicit ones (argument, env var) never fall through."""
  env_var = ENV_VARS[name]
  if data_dir is not None:
    return _load_explicit(data_dir, f'`data_dir` {data_dir!r}', name, seed)
  env_dir = os.environ.get(env_var)
  if env_dir:
    return _load_explicit(env_dir, f'environment variable {env_var}={env_dir!r}', name, seed)

  attempts = ['`data_dir`: not given', f'environment variable {env_var}: not set']
  keras_cache = os.path.join(os.path.expanduser('~'), KERAS_CACHE_PATHS[name])
  for path in (keras_cache,) + SYSTEM_DIRS[name]:
    if not os.path.exists(path):
      attempts.append(f'{path}: does not exist')
      continue
    try:
      return _load_path(path, name, seed)
    except DataSourceError as e:
      attempts.append(f'{path}: {e}')

  keras_loader = f'tf.keras.datasets.{name}.load_data()'
  try:
    splits = _download_with_keras(name)
  except Exception as e:  # pylint: disable=broad-except  # Any download failure is reported below.
    attempts.append(f'download through {keras_loader}: {type(e).__name__}: {e}')
  else:
    return _validated_splits(*splits, source=f'downloaded through {keras_loader}')

  tried = '\n'.join(f'  - {attempt}' for attempt in attempts)
  raise DataSourceError(
    f'No usable source for the {name!r} dataset. Tried, in order:\n{tried}\n'
    f'Fix: pass --data_dir (or `data_dir`) or set {env_var} to a directory holding the four '
    f'IDX files ({", ".join(IDX_FILE_STEMS.values())}, raw or .gz), only the two t10k files, or '
    'an .npz with x_train, y_train, x_test, y_test.'
  )


def _load_explicit(path: str, origin: str, name: str, seed: int) -> _Splits:
  """Loads from a path the user named, raising with that name when it is missing or unusable."""
  if not os.path.exists(path):
    raise DataSourceError(f'{origin} does not exist.')
  try:
    return _load_path(path, name, seed)
  except DataSourceError as e:
    raise DataSourceError(f'{origin} is not a usable {name} source: {e}') from e


def _download_with_keras(
  name: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Downloads (or reads Keras' cache) through `tf.keras.datasets`; needs network on first use."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Only needed for this fallback.

  (train_images, train_labels), (test_images, test_labels) = getattr(
    tf.keras.datasets, name
  ).load_data()
  return train_images, train_labels, test_images, test_labels


def _load_path(path: str, name: str, seed: int) -> _Splits:
  """Reads the splits from a directory (IDX files or an .npz) or from an .npz file.

  Raises:
    DataSourceError: If `path` holds no recognizable files or they are invalid.
  """
  if os.path.isfile(path):
    if not path.endswith('.npz'):
      raise DataSourceError(f'{path} is a file but not an .npz archive.')
    return _read_npz(path)
  if not os.path.isdir(path):
    raise DataSourceError(f'{path} is neither a directory nor an .npz file.')

  idx_files = {role: _find_idx_file(path, stem) for role, stem in IDX_FILE_STEMS.items()}
  found = {role for role, file in idx_files.items() if file is not None}
  if found == set(IDX_FILE_STEMS):
    train_images, train_labels = _read_idx_pair(
      idx_files['train_images'], idx_files['train_labels']
    )
    test_images, test_labels = _read_idx_pair(idx_files['test_images'], idx_files['test_labels'])
    source = 'IDX files ' + ', '.join(idx_files[role] for role in IDX_FILE_STEMS)
    return _Splits(train_images, train_labels, test_images, test_labels, source)
  if found == {'test_images', 'test_labels'}:
    images, labels = _read_idx_pair(idx_files['test_images'], idx_files['test_labels'])
    files = f'{idx_files["test_images"]}, {idx_files["test_labels"]}'
    return _split_test_only(images, labels, seed, files)
  if found:
    missing = ', '.join(IDX_FILE_STEMS[role] for role in IDX_FILE_STEMS if role not in found)
    raise DataSourceError(
      f'{path} holds an incomplete set of IDX files: missing {missing} (raw or .gz). A '
      'directory needs all four files, or only the two t10k files.'
    )

  npz_files = sorted(f for f in os.listdir(path) if f.endswith('.npz'))
  if f'{name}.npz' in npz_files:
    return _read_npz(os.path.join(path, f'{name}.npz'))
  if len(npz_files) == 1:
    return _read_npz(os.path.join(path, npz_files[0]))
  if npz_files:
    raise DataSourceError(
      f'{path} holds several .npz files ({", ".join(npz_files)}) and none is named {name}.npz.'
    )
  raise DataSourceError(
    f'{path} holds neither IDX files ({", ".join(IDX_FILE_STEMS.values())}, raw or .gz) nor '
    'an .npz file.'
  )


def _split_test_only(images: np.ndarray, labels: np.ndarray, seed: int, files: str) -> _Splits:
  """Splits a test-split-only source into a training pool and a held-out evaluation set.

  The examples are permuted with `np.random.default_rng(seed)`; the last
  `EVALUATION_FRACTION` of the permutation (2,000 of MNIST's 10,000) is held out for evaluation
  and the rest forms the training pool. The rule is spelled out in the returned `source`.
  """
  num_examples = len(images)
  num_evaluation = int(round(num_examples * EVALUATION_FRACTION))
  num_train = num_examples - num_evaluation
  permutation = np.random.default_rng(seed).permutation(num_examples)
  train_indices, evaluation_indices = permutation[:num_train], permutation[num_train:]
  source = (
    f'test split only ({files}): {num_examples} images permuted with '
    f'np.random.default_rng({seed}).permutation; first {num_train} -> training pool, last '
    f'{num_evaluation} -> held-out evaluation'
  )
  logging.info('Test-split-only source: %s', source)
  return _Splits(
    images[train_indices],
    labels[train_indices],
    images[evaluation_indices],
    labels[evaluation_indices],
    source,
  )


def _find_idx_file(directory: str, stem: str) -> Optional[str]:
  """Returns the path of IDX file `stem` in `directory` (dash or dot variant, raw or .gz)."""
  dotted_stem = stem.replace('-idx', '.idx')
  for candidate in (stem, stem + '.gz', dotted_stem, dotted_stem + '.gz'):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _read_idx_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads an images file and its labels file, checking that their counts agree."""
  images = read_idx(images_path, IDX_IMAGES_MAGIC)
  labels = read_idx(labels_path, IDX_LABELS_MAGIC)
  if images.shape[1:] != MNIST_IMAGE_SHAPE:
    raise DataSourceError(
      f'{images_path}: images must be {MNIST_IMAGE_SHAPE[0]}x{MNIST_IMAGE_SHAPE[1]}. Found '
      f'{images.shape[1]}x{images.shape[2]}.'
    )
  _check_labels(labels, labels_path)
  if len(images) != len(labels):
    raise DataSourceError(
      f'{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.'
    )
  return images, labels.astype(np.int64)


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Reads one uint8 IDX file (raw or gzip-compressed) into an array shaped by its header.

  Args:
    path: The file.
    expected_magic: `IDX_IMAGES_MAGIC` (2051, three dimensions) or `IDX_LABELS_MAGIC` (2049, one).

  Raises:
    DataSourceError: On an unreadable/corrupt file, a wrong magic number, a short header, or a
      payload whose length does not match the header.
  """
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        content = f.read()
    else:
      with open(path, 'rb') as f:
        content = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataSourceError(f'{path}: cannot be read ({type(e).__name__}: {e}).') from e

  if len(content) < 4:
    raise DataSourceError(f'{path}: file too short for an IDX header ({len(content)} bytes).')
  magic = int.from_bytes(content[:4], 'big')
  if magic != expected_magic:
    raise DataSourceError(
      f'{path}: bad IDX magic number {magic}, expected {expected_magic} '
      f'({"images" if expected_magic == IDX_IMAGES_MAGIC else "labels"}).'
    )
  num_dims = magic & 0xFF
  header_length = 4 * (1 + num_dims)
  if len(content) < header_length:
    raise DataSourceError(
      f'{path}: truncated IDX header ({len(content)} bytes, {header_length} expected).'
    )
  shape = tuple(int.from_bytes(content[4 * (i + 1) : 4 * (i + 2)], 'big') for i in range(num_dims))
  expected_length = header_length + int(np.prod(shape))
  if len(content) != expected_length:
    problem = 'truncated' if len(content) < expected_length else 'has trailing bytes'
    raise DataSourceError(
      f'{path}: file {problem}: header declares shape {shape} ({expected_length} bytes in all) '
      f'but the file holds {len(content)} bytes.'
    )
  return np.frombuffer(content, dtype=np.uint8, offset=header_length).reshape(shape)


def _read_npz(path: str) -> _Splits:
  """Reads an .npz with keys x_train, y_train, x_test, y_test (Keras' mnist.npz layout)."""
  keys = ('x_train', 'y_train', 'x_test', 'y_test')
  try:
    with np.load(path, allow_pickle=False) as archive:
      missing = [key for key in keys if key not in archive.files]
      if missing:
        raise DataSourceError(
          f'{path}: missing keys {missing}; an .npz source needs {", ".join(keys)}.'
        )
      arrays = {key: archive[key] for key in keys}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataSourceError(f'{path}: not a readable .npz archive ({type(e).__name__}: {e}).') from e
  return _validated_splits(
    arrays['x_train'], arrays['y_train'], arrays['x_test'], arrays['y_test'], source=path
  )


def _validated_splits(
  train_images: np.ndarray,
  train_labels: np.ndarray,
  test_images: np.ndarray,
  test_labels: np.ndarray,
  source: str,
) -> _Splits:
  """Checks arrays from an .npz or a Keras download: uint8 28x28 images, valid matching labels."""
  for split, images, labels in (
    ('train', train_images, train_labels),
    ('test', test_images, test_labels),
  ):
    if images.dtype != np.uint8 or images.shape[1:] != MNIST_IMAGE_SHAPE:
      raise DataSourceError(
        f'{source}: x_{split} must be uint8 [N, 28, 28]. Found {images.dtype} {images.shape}.'
      )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise DataSourceError(
        f'{source}: y_{split} must be a 1-D integer array. Found {labels.dtype} {labels.shape}.'
      )
    _check_labels(labels, source)
    if len(images) != len(labels):
      raise DataSourceError(
        f'{source}: x_{split} holds {len(images)} images but y_{split} {len(labels)} labels.'
      )
  return _Splits(
    train_images,
    train_labels.astype(np.int64),
    test_images,
    test_labels.astype(np.int64),
    source,
  )


def _check_labels(labels: np.ndarray, origin: str) -> None:
  """Raises DataSourceError if a label lies outside [0, MNIST_NUM_CLASSES)."""
  if labels.size and (labels.min() < 0 or labels.max() >= MNIST_NUM_CLASSES):
    raise DataSourceError(
      f'{origin}: labels must lie in [0, {MNIST_NUM_CLASSES}). Found values in '
      f'[{labels.min()}, {labels.max()}].'
    )
