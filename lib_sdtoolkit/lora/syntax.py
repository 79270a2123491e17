"""``<lora:...>`` prompt syntax, parsed exactly like the WebUI's extra-network parser.

The WebUI (modules/extra_networks.py) finds tags with ``<(\\w+):([^>]+)>``, removes them from the prompt, splits the
arguments on ``:`` and each argument once more on ``=`` (``item.split('=', 2)``: exactly two parts -> named, else
positional). :func:`parse_extra_networks` reproduces that; :func:`parse_prompt` turns the ``lora``/``lyco`` entries into
:class:`LoraRequest` objects with the built-in Lora extension's meaning of the positional arguments
(``NAME:TE:UNET:DYN``; UNET defaults to TE, TE to 1.0) plus the lora-block-weight extensions
(``lbw=``, ``start=``, ``stop=``, ``step=A-B``, a non-numeric third positional taken as a block-weight preset).

Bad arguments never raise: the request carries a warning naming the tag and falls back to the defaults, so one
malformed tag does not stop a generation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
#: tag names our network answers to (the built-in registers ``lora`` with the alias ``lyco``)
LORA_TAGS = ("lora", "lyco")


@dataclass
class ExtraNetworkParams:
    """What the WebUI's ``ExtraNetworkParams`` holds for one tag."""

    items: List[str]
    positional: List[str] = field(default_factory=list)
    named: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_items(cls, items: List[str]) -> "ExtraNetworkParams":
        p = cls(list(items))
        for item in p.items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                p.named[parts[0]] = parts[1]
            else:
                p.positional.append(item)
        return p


def parse_extra_networks(prompt: str) -> Tuple[str, Dict[str, List[ExtraNetworkParams]]]:
    """(prompt without the tags, {tag name: [params, ...]}) exactly as the WebUI's ``parse_prompt``."""
    res: Dict[str, List[ExtraNetworkParams]] = {}

    def found(m: "re.Match[str]") -> str:
        res.setdefault(m.group(1), []).append(ExtraNetworkParams.from_items(m.group(2).split(":")))
        return ""

    return RE_EXTRA_NET.sub(found, prompt), res


@dataclass
class LoraRequest:
    """One ``<lora:...>`` tag, resolved to numbers."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: Optional[int] = None
    lbw: Optional[str] = None          # preset name or comma-separated list, resolved by lora.blocks
    start: Optional[int] = None        # first sampling step (inclusive) the network is active
    stop: Optional[int] = None         # step from which it is off again
    tag: str = ""                      # the tag as written, for messages
    warnings: List[str] = field(default_factory=list)

    def key(self) -> tuple:
        return (self.name, self.te, self.unet, self.dyn, self.lbw, self.start, self.stop)


def _num(value: str, what: str, tag: str, warnings: List[str], default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        warnings.append(f"{tag}: {what} {value!r} is not a number; using {default}")
        return default


def _int(value: str, what: str, tag: str, warnings: List[str]) -> Optional[int]:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        warnings.append(f"{tag}: {what} {value!r} is not a whole number; ignored")
        return None


def request_from_params(p: ExtraNetworkParams, tagname: str = "lora") -> Optional[LoraRequest]:
    """The meaning the built-in Lora extension (+ lora-block-weight) gives to one tag's params."""
    tag = f"<{tagname}:{':'.join(p.items)}>"
    if not p.positional or not p.positional[0].strip():
        return None
    w: List[str] = []
    req = LoraRequest(name=p.positional[0], tag=tag, warnings=w)
    if len(p.positional) > 1:
        req.te = _num(p.positional[1], "text-encoder weight", tag, w, 1.0)
    if "te" in p.named:
        req.te = _num(p.named["te"], "te", tag, w, req.te)
    req.unet = req.te
    if len(p.positional) > 2:
        third = p.positional[2]
        try:
            req.unet = float(third)
        except ValueError:
            # lora-block-weight's older form: <lora:name:1:PRESET> or <lora:name:1:0,1,1,...>
            req.lbw = third
    if "unet" in p.named:
        req.unet = _num(p.named["unet"], "unet", tag, w, req.unet)
    if len(p.positional) > 3:
        req.dyn = _int(p.positional[3], "dyn", tag, w)
    if "dyn" in p.named:
        req.dyn = _int(p.named["dyn"], "dyn", tag, w)
    if "lbw" in p.named:
        req.lbw = p.named["lbw"]
    elif "w" in p.named:
        req.lbw = p.named["w"]
    if "start" in p.named:
        req.start = _int(p.named["start"], "start", tag, w)
    if "stop" in p.named:
        req.stop = _int(p.named["stop"], "stop", tag, w)
    if "step" in p.named:
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", p.named["step"])
        if m:
            req.start, req.stop = int(m.group(1)), int(m.group(2)) + 1
        else:
            w.append(f"{tag}: step {p.named['step']!r} is not A-B; ignored")
    known = {"te", "unet", "dyn", "lbw", "w", "start", "stop", "step"}
    for k in p.named:
        if k not in known:
            w.append(f"{tag}: unknown argument {k}= ignored")
    return req


def parse_prompt(prompt: str, tags: Tuple[str, ...] = LORA_TAGS) -> Tuple[str, List[LoraRequest]]:
    """(prompt without any extra-network tags, LoRA requests in prompt order)."""
    stripped, nets = parse_extra_networks(prompt)
    out: List[LoraRequest] = []
    # keep prompt order across lora/lyco
    for m in RE_EXTRA_NET.finditer(prompt):
        if m.group(1) in tags:
            r = request_from_params(ExtraNetworkParams.from_items(m.group(2).split(":")), m.group(1))
            if r is not None:
                out.append(r)
    return stripped, out
