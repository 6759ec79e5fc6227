"""Federated datasets: offline-capable loaders, client partitioners, tf.data preprocessing."""

from tff_clipq.data.federated import build_federated_data
from tff_clipq.data.federated import emnist_to_model_input
from tff_clipq.data.federated import FEDERATED_DATASET_NAMES
from tff_clipq.data.federated import federated_data_from_arrays
from tff_clipq.data.federated import federated_emnist
from tff_clipq.data.federated import FederatedData
from tff_clipq.data.federated import PARTITIONS
from tff_clipq.data.federated import preprocess_for_evaluation
from tff_clipq.data.federated import preprocess_for_training
from tff_clipq.data.partition import find_empty_clients
from tff_clipq.data.partition import label_histogram
from tff_clipq.data.partition import partition_dirichlet
from tff_clipq.data.partition import partition_iid
from tff_clipq.data.partition import partition_shards
from tff_clipq.data.sources import ARRAY_DATASET_NAMES
from tff_clipq.data.sources import ArrayDataset
from tff_clipq.data.sources import DataSourceError
from tff_clipq.data.sources import load_array_dataset
from tff_clipq.data.sources import read_idx
