"""Value types and client values shared by the aggregator tests."""

import numpy as np
import tensorflow_federated as tff

MATRIX = tff.TensorType(np.float32, [12, 10])
BIAS = tff.TensorType(np.float32, [10])
VALUE_TYPE = tff.StructWithPythonType([MATRIX, BIAS], list)
WEIGHT_TYPE = tff.TensorType(np.float32)


def client_values(num_clients: int, seed: int = 0) -> list[list[np.ndarray]]:
  """A [12, 10] matrix scaled by 1 + i and a [10] bias per client i."""
  rng = np.random.default_rng(seed)
  return [
    [
      (rng.standard_normal([12, 10]) * (1 + i)).astype(np.float32),
      rng.standard_normal([10]).astype(np.float32),
    ]
    for i in range(num_clients)
  ]
