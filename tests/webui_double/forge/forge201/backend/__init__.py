"""Forge 2.0.1 ``backend`` (double: the model patchers only; see ../README.md)."""
