"""Forge 2.0.1's own package: an extension tells it runs on Forge by ``importlib.util.find_spec("modules_forge")``."""
