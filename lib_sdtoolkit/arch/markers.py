"""Marker keys and what a checkpoint's metadata names: prediction type, zero terminal SNR, the base family.

**Marker keys** are top-level tensors that carry no weights but tell the host how to sample the model. Hosts
(Forge, ComfyUI, reForge) look only at the keys: ``v_pred`` -> v-prediction, ``ztsnr`` -> zero-terminal-SNR
sigmas (NoobAI v-pred ships both as empty tensors); ``edm_mean``/``edm_std`` (Playground v2.5) and
``edm_vpred.sigma_max``/``sigma_min`` select EDM sampling. Losing one makes the model render noise, so every tool
keeps them as they are stored (never converted, never averaged; merge takes them from model A).

**Prediction type** (:func:`prediction_of`): a ``v_pred`` key -> ``v``; ``edm_vpred.*`` -> ``v (EDM)``;
``edm_mean`` -> ``EDM``; else ``modelspec.prediction_type`` (``v``/``v_prediction`` -> ``v``, ``epsilon``/``eps`` ->
``eps``); else kohya's ``ss_v_parameterization`` ``True`` -> ``v``; else ``eps`` by default for SD1/SDXL (the
host's default), unknown for SD2 (768-v models carry no marker). When the metadata says v but the ``v_pred`` key is
missing, a note says that hosts will sample it as eps. ``ztsnr``: the ``ztsnr`` key, or ``ss_zero_terminal_snr``.

**Family** (:func:`family_of`): Illustrious, NoobAI, Pony ... only when a ``modelspec.*`` or ``ss_*`` metadata
field names it (architecture, title, tags, the kohya base model name); never guessed from the weights.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

#: top-level marker tensors hosts read by name (see the module docstring)
MARKER_KEYS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")


def is_marker_key(key: str) -> bool:
    return key in MARKER_KEYS


#: metadata fields that may name the base model, in the order they are trusted
FAMILY_FIELDS = ("modelspec.architecture", "modelspec.title", "modelspec.tags", "modelspec.description",
                 "ss_base_model_version", "ss_sd_model_name", "ss_output_name")
#: family name -> pattern (case-insensitive); NoobAI before Illustrious (NoobAI is trained from Illustrious and
#: its metadata may name both)
FAMILY_PATTERNS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("NoobAI", re.compile(r"noob[\s_-]?ai|\bnoob", re.I)),
    ("Illustrious", re.compile(r"illustrious", re.I)),
    ("Pony", re.compile(r"\bpony(?=\b|[_\-\s]|diffusion|v\d|xl)", re.I)),
    ("Animagine", re.compile(r"animagine", re.I)),
    ("Playground", re.compile(r"playground", re.I)),
)
_TRUE = ("true", "1", "yes")


def prediction_of(keys: Mapping[str, object], metadata: Optional[Mapping[str, str]], architecture: str
                  ) -> Dict[str, object]:
    """``{"prediction": "v"|"eps"|"v (EDM)"|"EDM"|None, "prediction_source": str|None, "ztsnr": bool,
    "markers": [keys], "notes": [...]}``."""
    meta = metadata or {}
    markers = [k for k in MARKER_KEYS if k in keys]
    notes: List[str] = []
    pred: Optional[str] = None
    source: Optional[str] = None
    if "v_pred" in keys:
        pred, source = "v", "marker key v_pred"
    elif "edm_vpred.sigma_max" in keys:
        pred, source = "v (EDM)", "marker key edm_vpred.sigma_max"
    elif "edm_mean" in keys:
        pred, source = "EDM", "marker key edm_mean"
    meta_pred: Optional[str] = None
    mp = str(meta.get("modelspec.prediction_type", "")).strip().lower()
    if mp in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
        meta_pred, msrc = "v", "metadata modelspec.prediction_type"
    elif mp in ("epsilon", "eps"):
        meta_pred, msrc = "eps", "metadata modelspec.prediction_type"
    elif str(meta.get("ss_v_parameterization", "")).strip().lower() in _TRUE:
        meta_pred, msrc = "v", "metadata ss_v_parameterization"
    if pred is None and meta_pred is not None:
        pred, source = meta_pred, msrc
        if meta_pred == "v":
            notes.append(f"the {msrc[len('metadata '):]} metadata says v-prediction but the file has no v_pred marker "
                         f"key: hosts decide from the key and will sample it as eps")
    elif pred is None and architecture in ("SD1", "SDXL", "SDXL-refiner"):
        pred, source = "eps", "default (no v_pred marker key, no prediction metadata)"
    elif pred == "v" and meta_pred == "eps":
        notes.append("the v_pred marker key says v-prediction but modelspec.prediction_type says epsilon; hosts "
                     "follow the key")
    ztsnr = "ztsnr" in keys
    if not ztsnr and str(meta.get("ss_zero_terminal_snr", "")).strip().lower() in _TRUE:
        notes.append("ss_zero_terminal_snr says zero terminal SNR but the file has no ztsnr marker key")
    return {"prediction": pred, "prediction_source": source, "ztsnr": ztsnr, "markers": markers, "notes": notes}


def family_of(metadata: Optional[Mapping[str, str]]) -> Tuple[Optional[str], Optional[str]]:
    """``(family, "field=value")`` when a metadata field names a known family, else ``(None, None)``."""
    if not metadata:
        return None, None
    for name, pat in FAMILY_PATTERNS:
        for f in FAMILY_FIELDS:
            v = metadata.get(f)
            if isinstance(v, str) and pat.search(v):
                shown = v if len(v) <= 80 else v[:77] + "..."
                return name, f"{f}={shown}"
    return None, None


__all__ = ["MARKER_KEYS", "is_marker_key", "prediction_of", "family_of", "FAMILY_FIELDS"]
