"""compare across Flux.1 layouts (found in the real Forge 2.0.1's Compare tab): an all-in-one file
(``model.diffusion_model.X`` + VAE + text encoders) and a bare BFL transformer file (``X``) were matched on raw key
names, so no tensor was in common and the pair was reported "identical" (cosine 1, rel L2 0, 0 keys)."""
from __future__ import annotations

import torch

from lib_sdtoolkit.compare import compare_files, format_table
from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.samples import flux


def test_all_in_one_and_bfl_flux_files_are_compared_on_the_transformer(tmp_path):
    bfl = flux.state_dict("bfl", "dev", seed=0, dtype=torch.float32)
    other = flux.state_dict("bfl", "dev", seed=1, dtype=torch.float32)
    aio = flux.state_dict("all-in-one", "dev", seed=0, dtype=torch.float32)
    prefix = flux.ALL_IN_ONE["transformer"]
    aio.update({prefix + k: v.clone() for k, v in bfl.items()})    # the same transformer inside an all-in-one file
    p_aio = save_safetensors(tmp_path / "aio.safetensors", aio)
    p_bfl = save_safetensors(tmp_path / "bfl.safetensors", bfl)
    p_other = save_safetensors(tmp_path / "other.safetensors", other)

    res = compare_files([p_aio, p_bfl, p_other]).to_dict()
    same, diff = res["pairs"][0], res["pairs"][1]                 # (aio, bfl), (aio, other)
    assert same["overall"]["keys"] == len(bfl)                    # every transformer tensor was compared
    assert same["overall"]["equal"] and all(g["equal"] for g in same["groups"].values())
    assert "D00" in same["groups"] and "S37" in same["groups"]
    assert diff["overall"]["keys"] == len(bfl) and not diff["overall"]["equal"]
    # the overall cosine of (aio, other) from plain torch over every transformer tensor, in float64
    dot = sum(float((bfl[k].double().flatten() @ other[k].double().flatten())) for k in bfl)
    na = sum(float(bfl[k].double().pow(2).sum()) for k in bfl)
    nb = sum(float(other[k].double().pow(2).sum()) for k in bfl)
    assert abs(diff["overall"]["cosine"] - dot / (na * nb) ** 0.5) < 1e-9
    text = format_table(res, ["aio", "bfl", "other"])
    assert "aio vs bfl: identical" in text and "aio vs other: differ in" in text


def test_a_pair_with_no_tensor_in_common_is_not_called_identical():
    from lib_sdtoolkit.compare import _Acc

    r = _Acc().result()
    assert r["keys"] == 0 and r["equal"] is False and r["rel_l2"] is None
