"""What a run reports: ``metrics.jsonl`` / TensorBoard / progress line, device peaks, throughput and MFU, memory,
classification metrics, and the figures of white-box probes."""
