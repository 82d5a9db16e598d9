"""Data pipelines for facediff: encoder export to shards, grain loaders, tfds builders."""
