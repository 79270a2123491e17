"""extract / bake / inspect through the CLI, syntax and block weights, registry."""
import json

import pytest
import torch

from lib_sdtoolkit import cli
from lib_sdtoolkit.files import load_state_dict, open_model, save_safetensors
from lib_sdtoolkit.lora import syntax
from lib_sdtoolkit.lora.blocks import load_user_presets, resolve_block_weights
from lib_sdtoolkit.lora.registry import LoraRegistry
from lib_sdtoolkit.lora.synth import make_lora_state_dict


@pytest.fixture(scope="module")
def tuned(fixture_files, tmp_path_factory):
    """The SD1 fixture plus a known rank-3 difference on a few attention layers and one 3x3 conv."""
    base = fixture_files["sd1"]
    sd = load_state_dict(base)
    g = torch.Generator().manual_seed(7)
    diffs = {}
    for k in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.output_blocks.5.1.proj_out.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
              "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"):
        w = sd[k]
        flat = w.reshape(w.shape[0], -1)
        d = (torch.randn(flat.shape[0], 3, generator=g) @ torch.randn(3, flat.shape[1], generator=g)) * 0.01
        diffs[k] = d.reshape(w.shape)
        sd[k] = w + diffs[k]
    d = tmp_path_factory.mktemp("extract")
    return base, save_safetensors(d / "tuned.safetensors", sd), diffs


def test_extract_then_bake_reproduces_low_rank_difference(tuned, tmp_path, capsys):
    base, tuned_path, diffs = tuned
    out = tmp_path / "ex.safetensors"
    rc = cli.main(["lora", "extract", str(tuned_path), str(base), "-o", str(out), "--rank", "4", "--conv-rank", "4",
                   "--clamp-quantile", "1", "--dtype", "fp32", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == 4
    with open_model(out) as r:
        assert r.metadata["ss_network_module"] == "networks.lora" and r.metadata["ss_base_model_version"] == "sd_v1"
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in r
        assert "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_down.weight" in r
        assert "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight" in r
    baked = tmp_path / "baked.safetensors"
    assert cli.main(["lora", "bake", str(base), f"{out}:1.0", "-o", str(baked), "-q"]) == 0
    b0, b1 = load_state_dict(base), load_state_dict(baked)
    assert set(b0) == set(b1)
    for k in b0:
        if k in diffs:
            torch.testing.assert_close(b1[k] - b0[k], diffs[k], rtol=1e-3, atol=2e-5)
        else:
            assert torch.equal(b0[k], b1[k]), k
    # the CLI refuses to overwrite and names the file
    assert cli.main(["lora", "bake", str(base), str(out), "-o", str(baked), "-q"]) == 2
    assert "exists" in capsys.readouterr().err


def test_bake_matches_patcher_formula_on_fp16(fixture_files, tmp_path):
    base = fixture_files["sd1_fp16"]
    with open_model(base) as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    sd = make_lora_state_dict(lambda k: shapes.get(k), "SD1", rank=2, seed=3,
                              name_filter=lambda n: "attn2_to_v" in n or "self_attn_v_proj" in n)
    lp = save_safetensors(tmp_path / "l.safetensors", sd)
    out = tmp_path / "b.safetensors"
    assert cli.main(["lora", "bake", str(base), f"{lp}:0.5", "-o", str(out), "-q"]) == 0
    b0, b1 = load_state_dict(base), load_state_dict(out)
    k = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    n = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v"
    up, down, alpha = sd[n + ".lora_up.weight"], sd[n + ".lora_down.weight"], float(sd[n + ".alpha"])
    ref = (b0[k].float() + 0.5 * (alpha / 2) * (up @ down)).half()
    assert b1[k].dtype == torch.float16 and torch.equal(b1[k], ref)


def test_inspect(tmp_path, capsys, fixture_files):
    with open_model(fixture_files["sd1"]) as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    sd = make_lora_state_dict(lambda k: shapes.get(k), "SD1", rank=8, alpha=4)
    p = tmp_path / "insp.safetensors"
    save_safetensors(p, sd, {"ss_output_name": "myalias", "ss_base_model_version": "sd_v1"})
    assert cli.main(["lora", "inspect", str(p), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["base_model"] == "SD1" and rep["types"] == {"lora": len(sd) // 3}
    assert set(rep["ranks"]) <= {"8", "4"} and rep["alphas"] == {"4": len(sd) // 3}
    assert rep["targets"]["unet"] > 100 and rep["targets"]["text_encoder"] == 72 and rep["unmatched"] == 0
    assert rep["conv_kxk_layers"] > 0
    # registry: by stem, alias, relative path
    reg = LoraRegistry([tmp_path])
    assert reg.find("insp").path == p and reg.find("myalias").path == p and reg.find("nothing") is None


WEBUI_CASES = [
    ("a <lora:foo:0.5> b", "a  b", [["foo", "0.5"]]),
    ("<lora:dir/my.file v2:1:0.3:8>x", "x", [["dir/my.file v2", "1", "0.3", "8"]]),
    ("<lora:n:te=0.2:unet=0.7:lbw=OUTD:start=3:stop=9>", "", [["n", "te=0.2", "unet=0.7", "lbw=OUTD", "start=3",
                                                              "stop=9"]]),
    ("<lora:n:1:a=b=c>", "", [["n", "1", "a=b=c"]]),
]


@pytest.mark.parametrize("prompt,stripped,items", WEBUI_CASES)
def test_extra_network_parser_like_webui(prompt, stripped, items):
    s, nets = syntax.parse_extra_networks(prompt)
    assert s == stripped and [p.items for p in nets["lora"]] == items
    # ``item.split('=', 2)``: 'a=b=c' has three parts, so it is positional in the WebUI
    if "a=b=c" in prompt:
        assert nets["lora"][0].positional == ["n", "1", "a=b=c"] and nets["lora"][0].named == {}


def test_lora_requests():
    s, reqs = syntax.parse_prompt("cat <lora:a> <lyco:b:0.5> <lora:c:0.1:0.9:16> <lora:d:te=0.3:lbw=INS:step=2-4> "
                                  "<lora:e:0.8:OUTALL> <lora:f:oops:zzz=1> <hypernet:h:1>")
    assert s.strip().startswith("cat") and "<" not in s
    r = {x.name: x for x in reqs}
    assert (r["a"].te, r["a"].unet) == (1.0, 1.0) and (r["b"].te, r["b"].unet) == (0.5, 0.5)
    assert (r["c"].te, r["c"].unet, r["c"].dyn) == (0.1, 0.9, 16)
    assert (r["d"].te, r["d"].unet, r["d"].lbw, r["d"].start, r["d"].stop) == (0.3, 0.3, "INS", 2, 5)
    assert r["e"].lbw == "OUTALL" and r["e"].unet == 0.8
    assert r["f"].te == 1.0 and any("oops" in w for w in r["f"].warnings) and any("zzz" in w for w in r["f"].warnings)
    assert "h" not in r


def test_block_weights(tmp_path):
    bw = resolve_block_weights("OUTD", "SD1")
    assert bw["BASE"] == 1 and bw["IN01"] == 0 and bw["OUT03"] == 1 and bw["OUT07"] == 0 and bw["IN00"] == 0
    assert len(bw) == 26
    assert resolve_block_weights("ALL0.5", "SDXL")["OUT05"] == 0.5
    assert resolve_block_weights(",".join(["1"] * 12), "SDXL")["OUT06"] == 0.0
    (tmp_path / "p.txt").write_text("# mine\nMINE:" + ",".join(str(i / 25) for i in range(26)) + "\n")
    user = load_user_presets(tmp_path / "p.txt")
    assert resolve_block_weights("MINE", "SD1", user)["OUT11"] == 1.0
    from lib_sdtoolkit.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="17 or 26"):
        resolve_block_weights("1,1,1", "SD1")
    with pytest.raises(InvalidInputError, match="unknown preset"):
        resolve_block_weights("NOPE", "SD1")


def test_routes_and_tab_functions(tuned, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server import make_router
    from lib_sdtoolkit.ui import lora_tab

    base, tuned_path, _ = tuned
    host = StandaloneHost(models_dir=tmp_path / "models", create=True)
    ck = host.model_dirs("checkpoint")[0]
    (ck / "base.safetensors").write_bytes(base.read_bytes())
    (ck / "tuned.safetensors").write_bytes(tuned_path.read_bytes())
    app = FastAPI()
    app.include_router(make_router(host))
    c = TestClient(app)
    r = c.post("/sdtoolkit/v1/lora/extract", json={"tuned": "tuned", "base": "base", "output": "ex", "rank": 2})
    assert r.status_code == 200, r.text
    loras = c.get("/sdtoolkit/v1/loras").json()
    assert [x["name"] for x in loras] == ["ex"] and loras[0]["metadata"]["ss_network_dim"] == "2"
    r = c.post("/sdtoolkit/v1/lora/bake", json={"checkpoint": "base", "loras": [{"lora": "ex"}], "output": "b"})
    assert r.status_code == 200 and r.json()["touched"] == 3  # the 3x3 conv needs conv_rank
    r = c.post("/sdtoolkit/v1/lora/bake", json={"checkpoint": "base", "loras": [{"lora": "ex"}], "output": "b"})
    assert r.status_code == 409 and "exists" in r.json()["detail"]
    r = c.post("/sdtoolkit/v1/lora/bake", json={"checkpoint": "base", "loras": [{"lora": "nope"}], "output": "c"})
    assert r.status_code == 404
    assert "lora" in lora_tab.do_inspect(host, "ex") and "sdtoolkit-ok" in lora_tab.do_bake(host, "base", "ex:0.5",
                                                                                            "c", False)
