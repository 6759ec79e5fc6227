"""Client partitioners: split a centralized training set into simulated clients.

Each partitioner returns a list with one int64 index array per client, indexing the training set;
every example is assigned to exactly one client. All are pure numpy and deterministic given
`seed`:

- `partition_iid`: a shuffled, balanced split (as in the paper), optionally with lognormal sizes.
- `partition_dirichlet`: label skew of Hsu et al. (2019), "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification": per class, the proportions of its
  examples that go to each client are drawn from Dirichlet(alpha). Small alpha: each client holds
  few classes; large alpha: near-uniform label distributions. Clients may end up empty.
- `partition_shards`: the pathological non-IID split of McMahan et al. (2017): examples sorted by
  label are cut into `num_clients * shards_per_client` shards and each client gets
  `shards_per_client` random shards.
"""

from __future__ import annotations

import numpy as np

Partition = list[np.ndarray]


def _check_num_clients(num_clients: int, num_examples: int | None = None) -> None:
  """Raises ValueError unless 1 <= num_clients (<= num_examples when given)."""
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
    raise ValueError(f'`num_clients` must be an integer. Found {num_clients!r}.')
  if num_clients < 1:
    raise ValueError(f'`num_clients` must be >= 1. Found {num_clients}.')
  if num_examples is not None and num_clients > num_examples:
    raise ValueError(
      f'`num_clients` must be <= the number of examples ({num_examples}). Found {num_clients}.'
    )


def _check_labels(labels: np.ndarray) -> np.ndarray:
  """Returns `labels` as an array, or raises ValueError unless it is a non-empty 1-D int array."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f'`labels` must be a non-empty 1-D integer array. Found dtype {labels.dtype}, shape '
      f'{labels.shape}.'
    )
  if labels.min() < 0:
    raise ValueError(f'`labels` must be non-negative. Found {labels.min()}.')
  return labels


def partition_iid(
  num_examples: int, num_clients: int, seed: int, size_sigma: float = 0.0
) -> Partition:
  """Shuffles the examples and splits them among clients, each client's labels matching the whole.

  Args:
    num_examples: Size of the training set.
    num_clients: Number of clients, 1 <= num_clients <= num_examples.
    seed: Seeds the shuffle and the client sizes.
    size_sigma: 0 gives balanced clients (sizes differ by at most one). A positive value draws
      relative client sizes from LogNormal(0, size_sigma) (larger sigma: more unbalanced); every
      client still gets at least one example.

  Returns:
    One index array per client.
  """
  if num_examples < 1:
    raise ValueError(f'`num_examples` must be >= 1. Found {num_examples}.')
  _check_num_clients(num_clients, num_examples)
  if not size_sigma >= 0:
    raise ValueError(f'`size_sigma` must be >= 0. Found {size_sigma}.')
  rng = np.random.default_rng(seed)
  permutation = rng.permutation(num_examples)
  if size_sigma == 0:
    return [part.astype(np.int64) for part in np.array_split(permutation, num_clients)]
  weights = rng.lognormal(mean=0.0, sigma=size_sigma, size=num_clients)
  sizes = 1 + _proportional_sizes(num_examples - num_clients, weights)
  return [part.astype(np.int64) for part in np.split(permutation, np.cumsum(sizes)[:-1])]


def _proportional_sizes(total: int, weights: np.ndarray) -> np.ndarray:
  """Integer sizes summing to `total`, proportional to `weights` (largest-remainder rounding)."""
  exact = total * weights / weights.sum()
  sizes = np.floor(exact).astype(np.int64)
  largest_remainders = np.argsort(sizes - exact, kind='stable')[: total - sizes.sum()]
  sizes[largest_remainders] += 1
  return sizes


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> Partition:
  """Label-skewed split: each class is spread over clients with Dirichlet(alpha) proportions.

  For every class, its examples are shuffled and cut at the cumulative proportions
  `p ~ Dirichlet(alpha * ones(num_clients))`. With small `alpha` (e.g. 0.1) most of a class lands
  on one or two clients; with large `alpha` (e.g. 100) every client sees all classes about
  equally. A client can receive no example at all (see `find_empty_clients`).

  Args:
    labels: int array [num_examples] of class labels.
    num_clients: Number of clients, >= 1.
    alpha: Dirichlet concentration, > 0.
    seed: Seeds the proportions and the shuffles.

  Returns:
    One index array per client, in random order within each client.
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients)
  if not alpha > 0 or not np.isfinite(alpha):
    raise ValueError(f'`alpha` must be > 0. Found {alpha}.')
  rng = np.random.default_rng(seed)
  client_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for label in np.unique(labels):
    class_indices = rng.permutation(np.flatnonzero(labels == label))
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    cut_points = np.round(np.cumsum(proportions)[:-1] * len(class_indices)).astype(np.int64)
    for client, part in enumerate(np.split(class_indices, cut_points)):
      client_parts[client].append(part)
  return [rng.permutation(np.concatenate(parts)).astype(np.int64) for parts in client_parts]


def partition_shards(
  labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
) -> Partition:
  """McMahan et al.'s pathological non-IID split into label-sorted shards.

  The examples are sorted by label (ties in a seeded random order), cut into
  `num_clients * shards_per_client` contiguous shards of (nearly) equal size, and each client
  gets `shards_per_client` shards chosen at random. A client therefore sees at most
  `shards_per_client` labels when shard boundaries fall on class boundaries (e.g. balanced
  classes whose size is a multiple of the shard size), and at most `2 * shards_per_client`
  otherwise.

  Args:
    labels: int array [num_examples] of class labels.
    num_clients: Number of clients, >= 1.
    shards_per_client: Shards per client, >= 1; `num_clients * shards_per_client` must not exceed
      the number of examples.
    seed: Seeds the order within each class and the shard assignment.

  Returns:
    One index array per client (its shards concatenated).
  """
  labels = _check_labels(labels)
  _check_num_clients(num_clients, len(labels))
  if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, (int, np.integer)):
    raise ValueError(f'`shards_per_client` must be an integer. Found {shards_per_client!r}.')
  if shards_per_client < 1:
    raise ValueError(f'`shards_per_client` must be >= 1. Found {shards_per_client}.')
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise ValueError(
      f'`num_clients * shards_per_client` must be <= the number of examples ({len(labels)}). '
      f'Found {num_clients} * {shards_per_client} = {num_shards}.'
    )
  rng = np.random.default_rng(seed)
  shuffled = rng.permutation(len(labels))
  sorted_by_label = shuffled[np.argsort(labels[shuffled], kind='stable')]
  shards = np.array_split(sorted_by_label, num_shards)
  shard_order = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [
    np.concatenate([shards[shard] for shard in client_shards]).astype(np.int64)
    for client_shards in shard_order
  ]


def label_histogram(labels: np.ndarray, partition: Partition, num_classes: int) -> np.ndarray:
  """Returns int64 counts [num_clients, num_classes]: row c counts the labels held by client c.

  Args:
    labels: non-empty 1-D array of non-negative integer labels of the training set.
    partition: one index array into `labels` per client, as the partitioners return.
    num_classes: number of classes; every label must be < num_classes.
  """
  labels = _check_labels(labels)
  if labels.max() >= num_classes:
    raise ValueError(f'`labels` must be < `num_classes` ({num_classes}). Found {labels.max()}.')
  return np.stack(
    [np.bincount(labels[indices], minlength=num_classes) for indices in partition]
  ).astype(np.int64)


def find_empty_clients(partition: Partition) -> list[int]:
  """Returns the positions (in `partition`) of clients that hold no example."""
  return [client for client, indices in enumerate(partition) if len(indices) == 0]
