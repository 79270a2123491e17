"""Forge 2.0.1 backend/args.py: settings the WebUI changes at run time (no ``online_lora`` key unless set)."""
dynamic_args = dict(embedding_dir="./embeddings", emphasis_name="original")
