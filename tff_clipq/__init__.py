"""tff_clipq: clipped uniform quantization for communication-efficient federated learning on TFF."""
