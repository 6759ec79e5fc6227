"""Federated datasets for TFF simulations: `ClientData` from partitioned arrays, tf.data pipelines.

`build_federated_data` loads a dataset (see `sources.py`), partitions its training set into clients
(see `partition.py`) and returns a `FederatedData`: a `tff.simulation.datasets.ClientData` for
training plus a centralized, held-out evaluation `tf.data.Dataset`. Every element, whatever the
dataset, is `OrderedDict(x=float32 [H, W, 1] in [0, 1] with 0 = background, y=int32 scalar)`.

Images stay uint8 in memory and are converted to float inside the tf.data map, so a client's
dataset costs a quarter of the float memory and serializes small when TFF ships it.

Long runs build every round's client datasets afresh, so the map function is traced once per
element structure and reused (`map_with_shared_function`): eager TensorFlow caches the kernel of
every dataset op it runs, keyed by the op's attributes, and a `Dataset.map` traces a function
with a new name each time, so each fresh `map` left a ~70 KB kernel in that cache for good.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional, Union

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# pylint: disable=g-direct-tensorflow-import  # The dataset op `Dataset.map` builds, see below.
from tensorflow.python.data.ops import dataset_ops
from tensorflow.python.data.ops import structured_function
from tensorflow.python.ops import gen_dataset_ops

# pylint: enable=g-direct-tensorflow-import
from tff_clipq.data import partition as partition_lib
from tff_clipq.data import sources

PARTITIONS = ('iid', 'dirichlet', 'shards')
EMNIST = 'emnist'
EMNIST_PARTITION = 'natural'
FEDERATED_DATASET_NAMES = sources.ARRAY_DATASET_NAMES + (EMNIST,)

Example = collections.OrderedDict  # OrderedDict(x=float32 [H, W, 1], y=int32 [])


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated training set and a centralized evaluation set.

  Attributes:
    train: Client datasets yielding `OrderedDict(x=float32 [H, W, 1] in [0, 1], y=int32 [])`.
      Clients without examples are left out, so sampling `train.client_ids` never picks one.
    test: Centralized held-out evaluation data, unbatched, with the same element structure.
    input_shape: `(H, W, 1)`.
    num_classes: Number of label classes.
    client_sizes: Number of training examples of each client in `train.client_ids`.
    label_histograms: int64 [len(train.client_ids), num_classes]; row k counts the labels of
      `train.client_ids[k]`.
    empty_clients: Positions in the partition of the clients that received no example (their ids
      are missing from `train.client_ids`).
    source: Where the data came from (see `sources.ArrayDataset.source`).
    partition_description: How the training set was split into clients.
  """

  train: tff.simulation.datasets.ClientData
  test: tf.data.Dataset
  input_shape: tuple[int, int, int]
  num_classes: int
  client_sizes: dict[str, int]
  label_histograms: np.ndarray
  empty_clients: list[int]
  source: str
  partition_description: str


def build_federated_data(
  dataset: str,
  partition: str = 'iid',
  num_clients: int = 10,
  seed: int = 0,
  data_dir: Optional[str] = None,
  dirichlet_alpha: float = 0.3,
  shards_per_client: int = 2,
  size_sigma: float = 0.0,
) -> FederatedData:
  """Loads `dataset` and splits its training set into `num_clients` clients.

  Args:
    dataset: One of `FEDERATED_DATASET_NAMES`. `emnist` is TFF's naturally federated EMNIST
      digits (clients are writers); it downloads on first use.
    partition: `iid`, `dirichlet` or `shards` (see `partition.py`); `natural` for `emnist`.
    num_clients: Number of clients (for `emnist`: writers sampled at random with `seed`).
    seed: Seeds the data split of test-split-only sources, the partition, and sampling.
    data_dir: Where to read the data (see `sources.load_array_dataset`); for `emnist`, the cache
      directory of `tff.simulation.datasets.emnist.load_data`.
    dirichlet_alpha: Dirichlet concentration for `partition='dirichlet'`.
    shards_per_client: Shards per client for `partition='shards'`.
    size_sigma: Lognormal sigma of client sizes for `partition='iid'` (0: balanced).

  Returns:
    A `FederatedData`.

  Raises:
    ValueError: On an unknown dataset or partition, or invalid partition arguments.
    sources.DataSourceError: If the data cannot be found or read.
  """
  if dataset not in FEDERATED_DATASET_NAMES:
    raise ValueError(f'`dataset` must be one of {FEDERATED_DATASET_NAMES}. Found {dataset!r}.')
  if dataset == EMNIST:
    if partition != EMNIST_PARTITION:
      raise ValueError(
        f'`partition` must be {EMNIST_PARTITION!r} for {EMNIST!r}, whose clients are its '
        f'writers. Found {partition!r}.'
      )
    return _load_emnist(num_clients, seed, data_dir)
  if partition not in PARTITIONS:
    raise ValueError(f'`partition` must be one of {PARTITIONS}. Found {partition!r}.')

  arrays = sources.load_array_dataset(dataset, data_dir=data_dir, seed=seed)
  num_examples = len(arrays.train_labels)
  if partition == 'iid':
    client_indices = partition_lib.partition_iid(num_examples, num_clients, seed, size_sigma)
    sizes = 'balanced' if size_sigma == 0 else f'lognormal sizes (sigma={size_sigma})'
    description = f'iid: {num_clients} clients, {sizes}, seed {seed}'
  elif partition == 'dirichlet':
    client_indices = partition_lib.partition_dirichlet(
      arrays.train_labels, num_clients, dirichlet_alpha, seed
    )
    description = (
      f'dirichlet: per-class client proportions ~ Dirichlet({dirichlet_alpha}), '
      f'{num_clients} clients, seed {seed}'
    )
  else:
    client_indices = partition_lib.partition_shards(
      arrays.train_labels, num_clients, shards_per_client, seed
    )
    description = (
      f'shards: {num_clients} clients x {shards_per_client} label-sorted shards of '
      f'~{num_examples // (num_clients * shards_per_client)} examples, seed {seed}'
    )
  return federated_data_from_arrays(arrays, client_indices, description)


def federated_data_from_arrays(
  arrays: sources.ArrayDataset,
  client_indices: partition_lib.Partition,
  partition_description: str,
) -> FederatedData:
  """Wraps a partitioned `ArrayDataset` as `FederatedData`; client ids are `client_000`, ....

  Client `i` of `client_indices` gets id `client_{i:03d}`; clients without examples are reported
  (absl warning, `FederatedData.empty_clients`) and left out of the `ClientData`.

  Args:
    arrays: the centralized dataset (uint8 images, int64 labels, train and test splits).
    client_indices: per client, the indices of its training examples.
    partition_description: how the training set was split, for the run's summary.
  """
  empty_clients = partition_lib.find_empty_clients(client_indices)
  id_width = max(3, len(str(len(client_indices) - 1)))
  indices_by_id = {
    f'client_{client:0{id_width}d}': indices
    for client, indices in enumerate(client_indices)
    if len(indices)
  }
  if empty_clients:
    logging.warning(
      '%d of %d clients received no example and are left out of the client ids: %s',
      len(empty_clients),
      len(client_indices),
      empty_clients,
    )
    partition_description += (
      f'; {len(empty_clients)} empty clients left out (positions {empty_clients})'
    )
  train_labels = arrays.train_labels.astype(np.int32)
  train = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
    list(indices_by_id),
    _make_client_dataset_fn(arrays.train_images, train_labels, indices_by_id),
  )
  return FederatedData(
    train=train,
    test=_examples_dataset(arrays.test_images, arrays.test_labels.astype(np.int32)),
    input_shape=arrays.train_images.shape[1:] + (1,),
    num_classes=arrays.num_classes,
    client_sizes={client_id: len(indices) for client_id, indices in indices_by_id.items()},
    label_histograms=partition_lib.label_histogram(
      arrays.train_labels, list(indices_by_id.values()), arrays.num_classes
    ),
    empty_clients=empty_clients,
    source=arrays.source,
    partition_description=partition_description,
  )


def _to_model_input(image: tf.Tensor, label: tf.Tensor) -> Example:
  """uint8 [H, W] image and integer label -> OrderedDict(x=float32 [H, W, 1] in [0, 1], y=int32)."""
  pixels = tf.cast(image, tf.float32) / 255.0
  return collections.OrderedDict(x=tf.expand_dims(pixels, -1), y=tf.cast(label, tf.int32))


def _examples_dataset(
  images: Union[np.ndarray, tf.Tensor], labels: Union[np.ndarray, tf.Tensor]
) -> tf.data.Dataset:
  """An unbatched dataset of model inputs from uint8 images [N, H, W] and int labels [N]."""
  return map_with_shared_function(
    tf.data.Dataset.from_tensor_slices((images, labels)), _to_model_input
  )


# The map functions traced so far, by Python function and input element spec (its repr, since
# nested specs such as OrderedDicts are not hashable). Bounded by the code's distinct map calls.
_SHARED_MAP_FUNCTIONS: dict[
  tuple[Callable[..., Any], str], structured_function.StructuredFunctionWrapper
] = {}


class _SharedFunctionMapDataset(dataset_ops.UnaryDataset):
  """`Dataset.map` with a function traced beforehand: TF's `_MapDataset` minus the tracing."""

  def __init__(
    self,
    input_dataset: tf.data.Dataset,
    map_func: structured_function.StructuredFunctionWrapper,
  ):
    self._map_func = map_func
    self._name = None
    variant_tensor = gen_dataset_ops.map_dataset(
      input_dataset._variant_tensor,  # pylint: disable=protected-access
      map_func.function.captured_inputs,
      f=map_func.function,
      use_inter_op_parallelism=True,
      preserve_cardinality=True,
      **self._common_args,
    )
    super().__init__(input_dataset, variant_tensor)

  def _functions(self) -> list[structured_function.StructuredFunctionWrapper]:
    return [self._map_func]

  @property
  def element_spec(self) -> Any:
    return self._map_func.output_structure


def map_with_shared_function(
  dataset: tf.data.Dataset, map_func: Callable[..., Any]
) -> tf.data.Dataset:
  """`dataset.map(map_func)`, tracing `map_func` once per input element spec in eager mode.

  `Dataset.map` traces `map_func` into a function with a new name on every call, and eager
  TensorFlow caches the kernel of every `MapDataset` op it runs, keyed by that name, for the
  life of the process (~70 KB each). Reusing one traced function reuses one cached kernel, so
  building datasets afresh every round does not grow memory. Same dataset graph, elements and
  element spec as `dataset.map(map_func)`; in graph mode (inside a `tf.function` or TFF
  computation), where the function lives in the graph, it is `dataset.map(map_func)`.

  Args:
    dataset: The input dataset.
    map_func: A tf.data map function of `dataset`'s elements. It is traced once and kept for
      the life of the process, keyed by the function object: pass a long-lived function (not a
      new lambda per call), without Python side effects meant to run per call.

  Returns:
    The mapped dataset.
  """
  if not tf.executing_eagerly():
    return dataset.map(map_func)
  key = (map_func, repr(dataset.element_spec))
  wrapper = _SHARED_MAP_FUNCTIONS.get(key)
  if wrapper is None:
    wrapper = structured_function.StructuredFunctionWrapper(
      map_func, 'Dataset.map()', dataset=dataset
    )
    _SHARED_MAP_FUNCTIONS[key] = wrapper
  return _SharedFunctionMapDataset(dataset, wrapper)


def _make_client_dataset_fn(
  images: np.ndarray, labels: np.ndarray, indices_by_id: dict[str, np.ndarray]
) -> Callable[[Union[str, tf.Tensor]], tf.data.Dataset]:
  """Returns the `serializable_dataset_fn` mapping a client id to that client's dataset.

  Called with a Python string (`ClientData.create_tf_dataset_for_client`), it slices the client's
  examples in numpy, so the dataset embeds only that client's data. Called with a string tensor
  (`ClientData.dataset_computation`, traced by TFF), it looks the client up with TF ops; the
  traced graph then holds the whole training set, as TFF's in-memory ClientData does.
  """
  client_ids = list(indices_by_id)
  concatenated_indices = np.concatenate(list(indices_by_id.values()))
  bounds = np.cumsum([0] + [len(indices) for indices in indices_by_id.values()])

  def client_dataset(client_id: Union[str, tf.Tensor]) -> tf.data.Dataset:
    if isinstance(client_id, str):
      indices = indices_by_id[client_id]
      return _examples_dataset(images[indices], labels[indices])
    position = tf.where(tf.equal(client_ids, client_id))[0, 0]
    start, end = tf.gather(bounds, position), tf.gather(bounds, position + 1)
    indices = tf.constant(concatenated_indices)[start:end]
    return _examples_dataset(tf.gather(images, indices), tf.gather(labels, indices))

  return client_dataset


def emnist_to_model_input(element: collections.OrderedDict) -> Example:
  """Maps a TFF EMNIST element (`pixels` float [28, 28], 1 = background; `label`) to an Example.

  Pixels are inverted (`1 - pixels`) so that, as for MNIST, 0 is background and 1 is ink.
  """
  pixels = 1.0 - tf.cast(element['pixels'], tf.float32)
  return collections.OrderedDict(
    x=tf.expand_dims(pixels, -1), y=tf.reshape(tf.cast(element['label'], tf.int32), [])
  )


def _load_emnist(num_clients: int, seed: int, cache_dir: Optional[str]) -> FederatedData:
  """Loads TFF's federated EMNIST digits (downloads ~170 MB on first use)."""
  try:
    train, test = tff.simulation.datasets.emnist.load_data(only_digits=True, cache_dir=cache_dir)
  except Exception as e:  # pylint: disable=broad-except  # Download and cache errors vary.
    raise sources.DataSourceError(
      'Federated EMNIST could not be loaded through tff.simulation.datasets.emnist.load_data'
      f'(only_digits=True, cache_dir={cache_dir!r}) ({type(e).__name__}: {e}). It needs network '
      'access on first use (then it is cached under ~/.keras/datasets or `data_dir`); offline, '
      'use mnist, fashion_mnist, digits or synthetic.'
    ) from e
  return federated_emnist(
    train,
    test,
    num_clients,
    seed,
    source='tff.simulation.datasets.emnist.load_data(only_digits=True)',
  )


def federated_emnist(
  train: tff.simulation.datasets.ClientData,
  test: tff.simulation.datasets.ClientData,
  num_clients: int,
  seed: int,
  source: str,
) -> FederatedData:
  """Samples `num_clients` writers of EMNIST-structured `train`; evaluates on all of `test`.

  Client sizes and label histograms are computed by reading the sampled clients' data once.

  Args:
    train: TFF's EMNIST training `ClientData` (clients are writers).
    test: TFF's EMNIST test `ClientData`, evaluated as one dataset.
    num_clients: how many writers to sample.
    seed: seeds the sample of writers.
    source: where the data came from, for the run's summary.
  """
  num_writers = len(train.client_ids)
  if not 1 <= num_clients <= num_writers:
    raise ValueError(f'`num_clients` must be in [1, {num_writers}]. Found {num_clients}.')
  rng = np.random.default_rng(seed)
  client_ids = sorted(rng.choice(train.client_ids, size=num_clients, replace=False).tolist())

  def client_dataset(client_id: Union[str, tf.Tensor]) -> tf.data.Dataset:
    return map_with_shared_function(train.serializable_dataset_fn(client_id), emnist_to_model_input)

  federated_train = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
    client_ids, client_dataset
  )
  num_classes = 10
  label_histograms = np.zeros((num_clients, num_classes), dtype=np.int64)
  for row, client_id in enumerate(client_ids):
    client_labels = federated_train.create_tf_dataset_for_client(client_id).map(lambda e: e['y'])
    for labels in client_labels.batch(4096).as_numpy_iterator():
      label_histograms[row] += np.bincount(labels, minlength=num_classes)
  return FederatedData(
    train=federated_train,
    test=test.create_tf_dataset_from_all_clients().map(emnist_to_model_input),
    input_shape=(28, 28, 1),
    num_classes=num_classes,
    client_sizes=dict(zip(client_ids, label_histograms.sum(axis=1).tolist())),
    label_histograms=label_histograms,
    empty_clients=[],
    source=source,
    partition_description=(
      f'natural (by writer): {num_clients} of {num_writers} writers sampled with '
      f'np.random.default_rng({seed})'
    ),
  )


def preprocess_for_training(
  dataset: tf.data.Dataset,
  batch_size: int,
  local_epochs: int,
  seed: Optional[int],
  shuffle_buffer: int = 1000,
) -> tf.data.Dataset:
  """Shuffles, repeats for `local_epochs` and batches a client's dataset (pure tf.data, traceable).

  With a `seed`, the shuffle order is fixed (`reshuffle_each_iteration=False`): every epoch and
  every iteration of the dataset sees the same order, so runs are reproducible. With `seed=None`
  the order is random and changes every epoch.

  An integer seed reaches TensorFlow as a numpy int64: eager TensorFlow keeps the tensor of every
  distinct Python number it converts for the life of the process (~0.7 KB each), and every client
  of every round has its own seed. Same seed tensors, hence the same order, as a Python int.

  Args:
    dataset: The client's unbatched dataset.
    batch_size: Examples per batch (the last batch may be smaller).
    local_epochs: How many times the client's examples are repeated.
    seed: Seed of the shuffle order, or None for a random order.
    shuffle_buffer: Shuffle buffer size (>= the client's size shuffles uniformly).

  Returns:
    The batched training dataset.
  """
  _check_positive_int(batch_size, 'batch_size')
  _check_positive_int(local_epochs, 'local_epochs')
  _check_positive_int(shuffle_buffer, 'shuffle_buffer')
  if isinstance(seed, (int, np.integer)) and -(2**63) <= seed < 2**63:
    seed = np.int64(seed)
  return (
    dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=seed is None)
    .repeat(local_epochs)
    .batch(batch_size)
  )


def preprocess_for_evaluation(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Batches a dataset for evaluation, in order and without repetition.

  Args:
    dataset: the unbatched evaluation dataset.
    batch_size: examples per batch (the last batch may be smaller).
  """
  _check_positive_int(batch_size, 'batch_size')
  return dataset.batch(batch_size)


def _check_positive_int(value: int, name: str) -> None:
  """Raises ValueError unless `value` is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'`{name}` must be an integer >= 1. Found {value!r}.')
