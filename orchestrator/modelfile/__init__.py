"""The model-file layer: where model files come from (locate: the default model, checked paths), GGUF tensor tables
with roles, architecture metadata, shards, the strict layout validator, realignment."""
