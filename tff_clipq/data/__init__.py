"""Federated datasets: offline-capable loaders, client partitioners, tf.data preprocessing."""
