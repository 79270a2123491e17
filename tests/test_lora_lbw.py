"""LoRA block weights (lora-block-weight's ``lbw=``): the editor's output parses back to its weights, presets of
another architecture are said and carried over by block name, and bake applies the same weights (issue 15, item 4).

References: lora-block-weight's block lists (BLOCKID17 / 26 for SD1, 12 / 20 for SDXL: written out below as data)
and its presets (``NAME:v1,...`` lines); the WebUI's extra-network parser (``lora.syntax``); a bake reference in
plain torch: W + m * w_block * (alpha / rank) * up @ down per layer.
"""
from __future__ import annotations

import random

import pytest
import torch

from lib_sdtoolkit.errors import InvalidInputError
from lib_sdtoolkit.lora import syntax
from lib_sdtoolkit.lora.blocks import PRESETS, lbw_list, preset_for, resolve_block_weights

#: lora-block-weight's lists (its BLOCKID17 / BLOCKID12), written out here
SD1_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
          "OUT08", "OUT09", "OUT10", "OUT11"]
SD1_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SDXL_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
SDXL_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
FLUX_58 = ["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]
BLOCKS = {"SD1": (SD1_26, SD1_17), "SD2": (SD1_26, SD1_17), "SDXL": (SDXL_20, SDXL_12), "Flux.1": (FLUX_58, FLUX_58[1:])}


def _parsed(text: str, arch: str):
    """The weights a prompt tag with ``lbw=text`` gets: the WebUI's parser, then the block rule."""
    _, reqs = syntax.parse_prompt(f"a photo <lora:some-lora:0.8:lbw={text}> of a cat")
    assert len(reqs) == 1 and not reqs[0].warnings and reqs[0].te == 0.8
    return resolve_block_weights(reqs[0].lbw, arch)


@pytest.mark.parametrize("arch", list(BLOCKS))
def test_lbw_list_parses_back_to_the_same_weights(arch):
    full, short = BLOCKS[arch]
    rng = random.Random(arch)
    for trial in range(30):
        on = short if trial % 2 else full           # half: only the short list's blocks set
        weights = {b: (round(rng.uniform(-1.5, 2.5), 3) if b in on and rng.random() < 0.8 else 0.0) for b in full}
        if trial == 0:
            weights = {b: 1.0 / 3.0 for b in full}  # rounded to 3 decimals in the list
        text = lbw_list(weights, arch)
        values = text.split(",")
        assert all(len(v.split(".")[-1]) <= 3 for v in values if "." in v) and "e" not in text
        want_len = len(short) if all(weights[b] == 0 for b in full if b not in short) else len(full)
        assert len(values) == want_len, (trial, text)
        got = _parsed(text, arch)
        assert got == {b: round(weights[b], 3) + 0.0 for b in full}, (trial, text)


def test_presets_are_lora_block_weights_and_say_when_of_another_architecture():
    # the 17-value presets, block by block (MIDD: BASE, IN05, IN07, IN08, M00, OUT03..OUT06)
    w, note = preset_for("MIDD", "SD1")
    assert note is None
    assert [b for b in SD1_26 if w[b] == 1] == ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                                                 "OUT06"]
    assert all(w[b] == 0 for b in SD1_26 if b not in ("BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                                                       "OUT05", "OUT06"))
    assert w == _parsed("MIDD", "SD1")
    # on SDXL the name would be refused; carried over by block name, and said
    with pytest.raises(InvalidInputError, match="17 values"):
        resolve_block_weights("OUTS", "SDXL")
    w, note = preset_for("OUTS", "SDXL")
    assert "17-value" in note and "refused" in note and "OUT09..OUT11" in note
    by_name = dict(zip(SD1_17, PRESETS["OUTS"]))
    assert w == {b: by_name.get(b, 0.0) for b in SDXL_20}
    assert _parsed(lbw_list(w, "SDXL"), "SDXL") == w
    # uniform presets fit every architecture; on Flux.1 ALL is every block, BASE included
    assert set(resolve_block_weights("ALL", "Flux.1").values()) == {1.0}
    assert set(resolve_block_weights("ALL0.5", "SDXL").values()) == {0.5, 0.0}
    assert resolve_block_weights("ALL0.5", "SDXL")["IN04"] == 0.5
    with pytest.raises(InvalidInputError, match="not a SDXL block"):
        lbw_list({"OUT11": 1.0}, "SDXL")


# ------------------------------------------------------------------------------------------------ the editor
@pytest.fixture(scope="module")
def host(models_dir):
    from lib_sdtoolkit.host import StandaloneHost

    return StandaloneHost(models_dir=models_dir)


def test_editor_gives_prompt_text_that_parses_to_its_table(host):
    from lib_sdtoolkit.ui import lbw_editor as E

    lora = [host.display_name(p, "lora") for p in host.list_models("lora")][0]
    # no lbw: every block at 1, no lbw= in the tag
    st = E.editor_state(host, lora, E.AUTO, "", "", 1.0)
    assert st["arch"] == "SD1" and st["weights"] is None
    assert [r[0] for r in st["rows"]] == SD1_26 and {r[1] for r in st["rows"]} == {"1"}
    assert st["lora_tag"] == f"<lora:{E.tag_name(lora)}:1>" and st["sdtlora_tag"].startswith("<sdtlora:")
    # a preset: written by name, the table is its weights, the chart has the block names and BASE apart
    spec, note = E.preset_spec("OUTD", "SD1")
    assert (spec, note) == ("OUTD", None)
    st = E.editor_state(host, lora, E.AUTO, "OUTD", spec, 0.7)
    assert st["lora_tag"] == f"<lora:{E.tag_name(lora)}:0.7:lbw=OUTD>"
    table = {b: float(v) for b, v in st["rows"]}
    assert _parsed_tag(st["lora_tag"], "SD1") == table == resolve_block_weights("OUTD", "SD1")
    assert "OUT05" in st["chart"] and "BASE" in st["chart"] and "sdtoolkit-warn" not in st["message"]
    # an edit of the table becomes a list that parses back to the edited table (3 decimals)
    rows = [list(r) for r in st["rows"]]
    rows[SD1_26.index("IN05")][1] = "0.33333"
    rows[SD1_26.index("OUT11")][1] = "-1"
    new = E.spec_from_table(rows, "SD1", spec)
    edited = dict(table, IN05=0.333, OUT11=-1.0)
    assert resolve_block_weights(new, "SD1") == edited
    assert E.spec_from_table(st["rows"], "SD1", spec) is None     # unchanged: the name stays
    st = E.editor_state(host, lora, E.AUTO, "OUTD", new, 0.7)
    assert _parsed_tag(st["sdtlora_tag"], "SD1", tag="sdtlora") == edited
    assert "OUT11 = -1" in st["message"] and "subtracted" in st["message"]
    assert st["bake"] == f"{lora}:0.7:lbw={new}"
    # a preset of another architecture on SDXL blocks: said, and a list that SDXL takes
    spec, note = E.preset_spec("MIDD", "SDXL")
    st = E.editor_state(host, lora, "SDXL", "MIDD", spec, 1)
    assert "17-value" in st["message"] and "This LoRA is a SD1 LoRA" in st["message"]
    assert _parsed_tag(st["lora_tag"], "SDXL") == preset_for("MIDD", "SDXL")[0]
    # Flux.1's 58 blocks on the axis, BASE apart; ALL is every block
    st = E.editor_state(host, lora, "Flux.1", "ALL", E.preset_spec("ALL", "Flux.1")[0], 1)
    assert [r[0] for r in st["rows"]] == FLUX_58 and {r[1] for r in st["rows"]} == {"1"}
    assert st["lora_tag"].endswith(":lbw=ALL>") and "S37" in st["chart"] and "D00" in st["chart"]
    # a list of the wrong length: the error, no prompt text
    st = E.editor_state(host, lora, E.AUTO, "", "1,0,1", 1)
    assert "sdtoolkit-error" in st["message"] and "17 or 26" in st["message"] and st["lora_tag"] == ""


def _parsed_tag(text: str, arch: str, tag: str = "lora"):
    """The weights the tag ``text`` gets: the WebUI's parser, then the block rule."""
    _, nets = syntax.parse_extra_networks(text)
    assert list(nets) == [tag]
    req = syntax.request_from_params(nets[tag][0], tag)
    assert not req.warnings
    return resolve_block_weights(req.lbw, arch) if req.lbw else None


# ------------------------------------------------------------------------------------------------ bake with lbw
def test_bake_applies_the_block_weights(fixture_files, tmp_path):
    from lib_sdtoolkit.files import load_state_dict, open_model, save_safetensors
    from lib_sdtoolkit.lora.bake import bake
    from lib_sdtoolkit.lora.synth import make_lora_state_dict

    base = fixture_files["sd1"]
    with open_model(base) as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    sd = make_lora_state_dict(lambda k: shapes.get(k), "SD1", rank=2, seed=11,
                              name_filter=lambda n: "attn2_to_v" in n or "self_attn_v_proj" in n)
    lp = save_safetensors(tmp_path / "l.safetensors", sd)
    weights = dict(zip(SD1_17, [0.5, 0, 0, 0, 1, 0, 0, 0.25, 0, 0, 0, 0, 0, 0, 0, 0, -1]))
    spec = ",".join(str(weights[b]) for b in SD1_17)
    out = tmp_path / "b.safetensors"
    res = bake(base, [(lp, 0.8, spec)], out)
    assert res["loras"][0]["lbw"] == spec
    b0, b1 = load_state_dict(base), load_state_dict(out)
    checks = {  # key -> (kohya module name, block)
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_v.weight":
            ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v", "IN05"),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight":
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", "M00"),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight":
            ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v", "OUT11"),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight":
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", "IN01"),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight":
            ("lora_te_text_model_encoder_layers_0_self_attn_v_proj", "BASE"),
    }
    for key, (n, block) in checks.items():
        up, down, alpha = sd[n + ".lora_up.weight"], sd[n + ".lora_down.weight"], float(sd[n + ".alpha"])
        want = b0[key].float() + 0.8 * weights[block] * (alpha / 2) * (up.float() @ down.float())
        torch.testing.assert_close(b1[key].float(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(b0["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"],
                       b1["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"])
    # a wrong list names the LoRA file and is refused before anything is written
    with pytest.raises(InvalidInputError, match="lbw of l.safetensors"):
        bake(base, [(lp, 1.0, "1,1,1")], tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_bake_job_takes_lbw_from_every_face_and_merge_refuses_it():
    from lib_sdtoolkit.jobs.lora import BakeRequest, MergeRequest

    req = BakeRequest.from_dict({"checkpoint": "c", "output": "o", "loras": [
        "a.safetensors:0.5:lbw=MIDD", {"lora": "b", "multiplier": 2, "lbw": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1"},
        "c"]})
    assert req.loras == [{"lora": "a.safetensors", "multiplier": 0.5, "lbw": "MIDD"},
                         {"lora": "b", "multiplier": 2.0, "lbw": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1"},
                         {"lora": "c", "multiplier": 1.0}]
    with pytest.raises(InvalidInputError, match="lbw"):
        MergeRequest.from_dict({"loras": ["a:1:lbw=MIDD"], "output": "o"})
    with pytest.raises(InvalidInputError, match="names no preset"):
        BakeRequest.from_dict({"checkpoint": "c", "output": "o", "loras": ["a:1:lbw="]})


def test_bake_with_lbw_is_the_same_on_the_cli_the_api_and_the_tab(fixture_files, tmp_path, capsys):
    """``NAME:M:lbw=...`` on the CLI and in the tab's list, ``{"lora", "multiplier", "lbw"}`` in the API: the same
    bytes on disk, and the bake record names the lbw."""
    import json
    import shutil

    from fastapi.testclient import TestClient

    from lib_sdtoolkit import cli
    from lib_sdtoolkit.files import open_model, save_safetensors
    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.lora.synth import make_lora_state_dict
    from lib_sdtoolkit.server.app import create_app
    from lib_sdtoolkit.ui import lora_tab

    host = StandaloneHost(models_dir=tmp_path / "models", create=True, progress_sink=lambda *a: None)
    ck, lo = host.model_dirs("checkpoint")[0], host.model_dirs("lora")[0]
    shutil.copyfile(fixture_files["sd1"], ck / "base.safetensors")
    with open_model(ck / "base.safetensors") as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    save_safetensors(lo / "given.safetensors", make_lora_state_dict(lambda k: shapes.get(k), "SD1", rank=2, seed=5,
                                                                    name_filter=lambda n: "attn2" in n))
    out = ck / "lbw-bake.safetensors"
    blobs = []
    assert cli.main(["lora", "bake", str(ck / "base.safetensors"), f"{lo / 'given.safetensors'}:0.5:lbw=OUTD",
                     "-o", str(out), "--overwrite", "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loras"][0]["lbw"] == "OUTD"
    blobs.append(out.read_bytes())
    client = TestClient(create_app(host, ui=False), raise_server_exceptions=False)
    r = client.post("/sdtoolkit/v1/lora/bake", json={
        "checkpoint": "base", "output": "lbw-bake", "overwrite": True,
        "loras": [{"lora": "given", "multiplier": 0.5, "lbw": "OUTD"}]})
    assert r.status_code == 200, r.text
    blobs.append(out.read_bytes())
    status, rep = lora_tab.run_action(host, "bake", {"checkpoint": "base.safetensors", "output": "lbw-bake",
                                                     "overwrite": True, "loras": "given:0.5:lbw=OUTD\n"})
    assert rep is not None, status
    assert "lbw=OUTD" in status
    blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    with open_model(out) as r:
        assert json.loads(r.metadata["sdtoolkit_lora_bake"])[0]["lbw"] == "OUTD"
    # a wrong preset is a 4xx naming it
    r = client.post("/sdtoolkit/v1/lora/bake", json={
        "checkpoint": "base", "output": "lbw-bad", "loras": [{"lora": "given", "lbw": "NOPE"}]})
    assert 400 <= r.status_code < 500 and "NOPE" in r.text
