"""The worker room: Redis Streams in, scores and masks out, Prometheus metrics."""
