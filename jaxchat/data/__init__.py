"""Data: shard download, task datasets, the tiny embedded corpus and grain pipelines."""
