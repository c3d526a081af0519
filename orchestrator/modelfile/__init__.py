"""The model-file layer: GGUF tensor tables with roles, architecture metadata, shards, realignment."""
