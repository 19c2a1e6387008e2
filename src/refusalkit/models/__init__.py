"""Loading a model (hub id, folder, GGUF, short names), its structure (decoder blocks, output
projections), chat formatting, int8 storage, and the model owner."""
