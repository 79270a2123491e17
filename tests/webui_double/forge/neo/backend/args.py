"""Forge Neo backend/args.py: settings the WebUI changes at run time."""
dynamic_args = dict(embedding_dir="./embeddings", emphasis_name="original")
