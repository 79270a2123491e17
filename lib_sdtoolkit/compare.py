"""How related are two (or more) models, block by block: cosine similarity and relative L2 difference of the weights.

Answers "is this a merge of X and Y", "which blocks did this fine-tune change", "is this VAE the same as that one".

Keys are grouped the way a merge groups them: the denoiser's keys by the architecture's merge blocks (``BASE``,
``IN00``..``OUT11`` for SD1; the MBW table of :mod:`lib_sdtoolkit.arch.blocks`), every other key by its component
(``text_encoder``, ``text_encoder_2``, ``vae``, ``ema``, ...). For each pair of models and each group:

* ``cosine``  = <a, b> / (|a| |b|) over every floating tensor of the group taken as one vector;
* ``rel_l2``  = |a - b| / |a| (relative to the first model of the pair; None where |a| is 0 and b is not);
* ``equal``   = every tensor of the group has the same values in both (exact; then cosine is 1 and rel_l2 0).

Sums are accumulated in float64 one tensor (in chunks) at a time: memory is a few tensors, whatever the model size.
Keys are matched by name; a VAE inside a checkpoint (``first_stage_model.``) and a standalone VAE file (bare
``encoder.``/``decoder.``) are matched on the VAE's own names, so a checkpoint's VAE can be compared with a VAE file.
Integer tensors (``position_ids``) and marker keys are left out of the sums and counted as ``skipped``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import ArchitectureError, InvalidInputError

#: elements per float64 chunk (32 MiB of float64 per operand)
CHUNK = 1 << 22

#: components that are not grouped by merge block, in the order they are shown
COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "ema", "junk")


@dataclass
class _Acc:
    dot: float = 0.0
    na: float = 0.0
    nb: float = 0.0
    dd: float = 0.0
    keys: int = 0
    elements: int = 0
    equal: bool = True

    def result(self) -> Dict[str, Any]:
        if self.keys == 0:  # nothing in common was compared: neither "the same" nor a similarity
            return {"cosine": 0.0, "rel_l2": None, "equal": False, "keys": 0, "elements": 0}
        if self.equal:
            cos, rel = 1.0, 0.0
        else:
            cos = self.dot / math.sqrt(self.na * self.nb) if self.na > 0 and self.nb > 0 else (
                1.0 if self.na == self.nb == 0 else 0.0)
            cos = max(-1.0, min(1.0, cos))
            rel = math.sqrt(self.dd) / math.sqrt(self.na) if self.na > 0 else (0.0 if self.dd == 0 else None)
        return {"cosine": cos, "rel_l2": rel, "equal": self.equal, "keys": self.keys, "elements": self.elements}


@dataclass
class PairResult:
    a: int
    b: int
    groups: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    overall: Dict[str, Any] = field(default_factory=dict)
    #: keys present in both with different shapes (not compared)
    shape_mismatch: List[str] = field(default_factory=list)


@dataclass
class CompareResult:
    files: List[str]
    architectures: List[str]
    groups: List[str]
    pairs: List[PairResult]
    #: per model: compared keys missing from it that another model has
    missing: List[List[str]]
    skipped: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"files": list(self.files), "architectures": list(self.architectures), "groups": list(self.groups),
                "pairs": [{"a": p.a, "b": p.b, "groups": p.groups, "overall": p.overall,
                           "shape_mismatch": p.shape_mismatch} for p in self.pairs],
                "missing": [len(m) for m in self.missing], "missing_first": [m[:5] for m in self.missing],
                "skipped": self.skipped}


#: the denoiser's prefix in a checkpoint (SD's, and a Flux all-in-one file's) that a bare file (BFL's flux1-dev) lacks
DENOISER_PREFIX = "model.diffusion_model."


def _canonical(key: str, comp: str) -> str:
    """The name a key is matched on across files: the VAE's own names for VAE keys (checkpoint or VAE file), the
    denoiser's own names for its keys (a Flux all-in-one file and a bare BFL transformer file hold the same
    tensors under ``model.diffusion_model.X`` and ``X``)."""
    if comp == "vae":
        from .arch.families import VAE_PREFIX

        return "vae:" + (key[len(VAE_PREFIX):] if key.startswith(VAE_PREFIX) else key)
    if comp in ("unet", "transformer"):
        return "denoiser:" + (key[len(DENOISER_PREFIX):] if key.startswith(DENOISER_PREFIX) else key)
    return key


def _group_keys(reader: Any) -> Tuple[str, Dict[str, Tuple[str, str]]]:
    """(architecture, canonical name -> (key in the file, group)) for one open reader."""
    from .arch import detect, split_components
    from .arch.blocks import MBW, convention

    infos = reader.infos()
    info = detect(infos, getattr(reader, "metadata", None))
    if info.architecture in ("unknown", "LoRA", "ControlNet"):
        what = {"unknown": "a model the toolkit does not know"}.get(info.architecture, f"a {info.architecture} file")
        raise ArchitectureError(f"compare takes checkpoints, VAEs or text encoders; this is {what}",
                                path=str(reader.path))
    try:
        conv = convention(MBW, info.architecture) if info.is_checkpoint or info.architecture == "Flux.1" else None
    except ArchitectureError:
        conv = None
    out: Dict[str, Tuple[str, str]] = {}
    for comp, keys in split_components(infos.keys(), info).items():
        for k in keys:
            if comp == "marker":
                group = "marker"
            elif comp in ("unet", "transformer") and conv is not None:
                try:
                    group = conv.block_of(k)
                except ArchitectureError:
                    group = comp
            else:
                group = comp
            out[_canonical(k, comp)] = (k, group)
    return info.architecture, out


def _family(arch: str) -> str:
    return "SDXL" if arch == "SDXL-refiner" else arch


def _group_order(groups: Sequence[str], archs: Sequence[str]) -> List[str]:
    from .arch.blocks import MBW, convention

    order: List[str] = []
    for arch in archs:
        try:
            order += [b for b in convention(MBW, arch).blocks if b not in order]
        except (ArchitectureError, ValueError):
            pass
    order += [c for c in ("unet", "transformer") + COMPONENT_ORDER if c not in order]
    present = set(groups)
    return [g for g in order if g in present] + sorted(present - set(order))


def compare_files(paths: Sequence[Path], progress: Optional[Callable[..., None]] = None,
                  check: Optional[Callable[[], None]] = None) -> CompareResult:
    """Compare every pair of ``paths`` group by group (see the module's doc). ``progress(done, total, detail)`` is
    called per key; ``check()`` between keys (raises to stop)."""
    import torch

    from .files import open_model

    if len(paths) < 2:
        raise InvalidInputError("compare: name two or more models")
    readers = []
    try:
        for p in paths:
            readers.append(open_model(p))
        layouts = [_group_keys(r) for r in readers]
        archs = [a for a, _ in layouts]
        fams = {_family(a) for a in archs if a != "VAE"}
        if len(fams) > 1:
            desc = ", ".join(f"{Path(p).name} is {a}" for p, a in zip(paths, archs))
            raise ArchitectureError(f"compare needs models of one architecture (a VAE file may be compared with a "
                                    f"checkpoint's VAE): {desc}")
        # every name some model has, in the first model's order then the others'
        names: List[str] = []
        seen = set()
        for _, lay in layouts:
            for n in lay:
                if n not in seen:
                    seen.add(n)
                    names.append(n)
        missing = [[n for n in names if n not in lay] for _, lay in layouts]
        pairs = [PairResult(i, j) for i, j in combinations(range(len(readers)), 2)]
        acc: Dict[Tuple[int, str], _Acc] = {}
        totals: Dict[int, _Acc] = {k: _Acc() for k in range(len(pairs))}
        skipped = 0
        for n_done, name in enumerate(names):
            if check is not None:
                check()
            if progress is not None:
                progress(n_done, len(names), name)
            have = [(idx, lay[name]) for idx, (_, lay) in enumerate(layouts) if name in lay]
            if len(have) < 2:
                continue
            group = have[0][1][1]
            if group == "marker":
                skipped += 1
                continue
            infos = {idx: readers[idx].info(key) for idx, (key, _) in have}
            if not all(infos[idx].dtype.is_floating_point for idx, _ in have):
                skipped += 1
                continue
            tensors = {idx: readers[idx].get(key) for idx, (key, _) in have}
            for pi, pr in enumerate(pairs):
                if pr.a not in tensors or pr.b not in tensors:
                    continue
                ta, tb = tensors[pr.a], tensors[pr.b]
                if tuple(ta.shape) != tuple(tb.shape):
                    pr.shape_mismatch.append(name)
                    continue
                for a_ in (acc.setdefault((pi, group), _Acc()), totals[pi]):
                    a_.keys += 1
                    a_.elements += ta.numel()
                _accumulate(ta, tb, (acc[(pi, group)], totals[pi]), torch)
            del tensors
        if progress is not None:
            progress(len(names), len(names), "")
        groups = _group_order({g for (_, g) in acc}, archs)
        for pi, pr in enumerate(pairs):
            pr.groups = {g: acc[(pi, g)].result() for g in groups if (pi, g) in acc}
            pr.overall = totals[pi].result()
        return CompareResult([str(p) for p in paths], archs, groups, pairs, missing, skipped)
    finally:
        for r in readers:
            r.close()


def _accumulate(ta: Any, tb: Any, accs: Sequence[_Acc], torch: Any) -> None:
    fa, fb = ta.reshape(-1), tb.reshape(-1)
    same = ta.dtype == tb.dtype and torch.equal(fa, fb)
    dot = na = nb = dd = 0.0
    for s in range(0, fa.numel(), CHUNK):
        a = fa[s:s + CHUNK].to(torch.float64)
        b = fb[s:s + CHUNK].to(torch.float64)
        na += float(torch.dot(a, a))
        if same:
            continue
        nb += float(torch.dot(b, b))
        dot += float(torch.dot(a, b))
        d = a - b
        dd += float(torch.dot(d, d))
        if not bool(torch.isfinite(d).all()):
            raise InvalidInputError("compare: a tensor holds inf or NaN; similarity is undefined there")
    if same:
        nb, dot, dd = na, na, 0.0
    for acc in accs:
        acc.dot += dot
        acc.na += na
        acc.nb += nb
        acc.dd += dd
        acc.equal = acc.equal and same


def format_table(result: Dict[str, Any], names: Sequence[str]) -> str:
    """A human table: for two models one row per group; for more, the pairwise matrix of the overall cosine and
    then, per pair, the groups that differ."""
    lines: List[str] = []
    pairs = result["pairs"]
    if len(names) == 2:
        p = pairs[0]
        lines.append(f"{names[0]}  vs  {names[1]}  ({result['architectures'][0]} / {result['architectures'][1]})")
        lines.append(f"{'group':<16} {'cosine':>12} {'rel L2':>10}  {'keys':>5}  same")
        for g in result["groups"]:
            r = p["groups"].get(g)
            if r is not None:
                lines.append(_row(g, r))
        lines.append(_row("all", p["overall"]))
        if not p["overall"]["keys"]:
            lines.append("no tensor name in common: nothing was compared")
    else:
        w = max(len(n) for n in names)
        lines.append("overall cosine similarity (1 = same direction; 'same' = identical values)")
        lines.append(" " * (w + 2) + "  ".join(f"{i:>10}" for i in range(len(names))))
        m = {(p["a"], p["b"]): p["overall"] for p in pairs}
        for i, n in enumerate(names):
            cells = []
            for j in range(len(names)):
                r = m.get((min(i, j), max(i, j)))
                cells.append(f"{'-':>10}" if i == j else f"{'same' if r['equal'] else format(r['cosine'], '.6f'):>10}")
            lines.append(f"{n:<{w}} {i:>1} " + "  ".join(cells))
        for p in pairs:
            changed = [g for g in result["groups"] if g in p["groups"] and not p["groups"][g]["equal"]]
            lines.append(f"{names[p['a']]} vs {names[p['b']]}: "
                         + ("no tensor name in common: nothing compared" if not p["overall"]["keys"] else
                            f"differ in {len(changed)} of {len(p['groups'])} groups" if changed else "identical"))
    for i, n in enumerate(result["missing"]):
        if n:
            lines.append(f"{names[i]} lacks {n} keys the others have (first: {result['missing_first'][i][0]})")
    for p in pairs:
        if p["shape_mismatch"]:
            lines.append(f"{names[p['a']]} vs {names[p['b']]}: {len(p['shape_mismatch'])} keys differ in shape "
                         f"(first: {p['shape_mismatch'][0]})")
    return "\n".join(lines)


def _row(g: str, r: Dict[str, Any]) -> str:
    rel = "n/a" if r["rel_l2"] is None else f"{r['rel_l2']:.4g}"
    return f"{g:<16} {r['cosine']:>12.8f} {rel:>10}  {r['keys']:>5}  {'yes' if r['equal'] else 'no'}"


__all__ = ["compare_files", "CompareResult", "PairResult", "format_table"]
