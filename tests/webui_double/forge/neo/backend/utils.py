"""Forge Neo backend/utils.py: attribute access by dotted parameter name."""
import torch


def get_attr_with_parent(obj, attr):
    parent, name = obj, None
    for name in attr.split("."):
        parent, obj = obj, getattr(obj, name)
    return parent, name, obj


def set_attr_raw(obj, attr, value):
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def set_attr(obj, attr, value):
    set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))
