"""Forge Neo's own package: an extension tells it runs on Forge by ``importlib.util.find_spec("modules_forge")``."""
