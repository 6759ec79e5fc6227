"""TFF aggregation factories that send clipped, quantized, bit-packed client values."""
