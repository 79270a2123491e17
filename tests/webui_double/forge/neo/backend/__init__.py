"""Forge Neo ``backend`` (double: the model patchers only; see ../README.md)."""
