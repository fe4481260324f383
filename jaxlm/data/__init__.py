"""The data layer: record schemas, readers, TFDS builders, sources, grain pipelines, the world."""
