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
                   "--clamp-quantile", "1", "--dtype", "fp32", "-q", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
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


# ---------------------------------------------------------------------------- the LoRA jobs and their three faces
# CLI (python -m lib_sdtoolkit lora ACTION), API (POST /sdtoolkit/v1/lora/ACTION) and the LoRA tools tab all run the
# job of jobs/lora.py: same request fields, same report, same bytes on disk.

@pytest.fixture(scope="module")
def faces(tuned, tmp_path_factory):
    """A library holding base.safetensors / tuned.safetensors and a LoRA given.safetensors, its StandaloneHost
    and an API client on it."""
    import shutil

    from fastapi.testclient import TestClient

    from lib_sdtoolkit.host import StandaloneHost
    from lib_sdtoolkit.server.app import create_app

    base, tuned_path, _ = tuned
    root = tmp_path_factory.mktemp("lora_faces") / "models"
    host = StandaloneHost(models_dir=root, create=True, progress_sink=lambda *a: None)
    ck = host.model_dirs("checkpoint")[0]
    shutil.copyfile(base, ck / "base.safetensors")
    shutil.copyfile(tuned_path, ck / "tuned.safetensors")
    with open_model(base) as r:
        shapes = {k: i.shape for k, i in r.infos().items()}
    given = make_lora_state_dict(lambda k: shapes.get(k), "SD1", rank=2, seed=5, name_filter=lambda n: "attn2" in n)
    save_safetensors(host.model_dirs("lora")[0] / "given.safetensors", given)
    client = TestClient(create_app(host, ui=False), raise_server_exceptions=False)
    return {"root": root, "host": host, "client": client, "ck": ck, "lora": host.model_dirs("lora")[0]}


def _three_faces(faces, capsys, action, cli_args, body, tab_values, out):
    """Run ``action`` through the CLI, the API and the tab: (reports, output bytes or None) per face."""
    from lib_sdtoolkit.ui import lora_tab

    reports, files = [], []
    capsys.readouterr()
    assert cli.main(["lora", action, *map(str, cli_args), "--json", *(["-q"] if action != "inspect" else [])]) == 0
    reports.append(json.loads(capsys.readouterr().out))
    files.append(out.read_bytes() if out else None)
    r = faces["client"].post(f"/sdtoolkit/v1/lora/{action}", json=body)
    assert r.status_code == 200, r.text
    reports.append(r.json())
    files.append(out.read_bytes() if out else None)
    status, rep = lora_tab.run_action(faces["host"], action, tab_values)
    assert rep is not None, status
    reports.append(rep)
    files.append(out.read_bytes() if out else None)
    return reports, files


def test_extract_bake_inspect_give_the_same_result_on_every_face(faces, capsys):
    ck, lo = faces["ck"], faces["lora"]
    # extract, with every field away from its default (the tab sets dtype too)
    out = lo / "par-ex.safetensors"
    reports, files = _three_faces(
        faces, capsys, "extract",
        [ck / "tuned.safetensors", ck / "base.safetensors", "-o", out, "--rank", "3", "--conv-rank", "2",
         "--clamp-quantile", "0.9", "--dtype", "fp32", "--overwrite"],
        {"tuned": "tuned", "base": "base", "output": "par-ex", "rank": 3, "conv_rank": 2, "clamp_quantile": 0.9,
         "dtype": "fp32", "overwrite": True},
        {"tuned": "tuned.safetensors", "base": "base.safetensors", "rank": 3.0, "conv_rank": 2.0,
         "clamp_quantile": 0.9, "device": "cpu", "dtype": "fp32", "output": "par-ex.safetensors", "overwrite": True},
        out)
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["name"] == "par-ex.safetensors" and reports[0]["layers"] == 4 and reports[0]["conv_rank"] == 2
    assert files[0] == files[1] == files[2]
    sd = load_state_dict(out)
    assert {t.dtype for t in sd.values()} == {torch.float32}
    assert sd["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape[0] == 2  # conv rank
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[0] == 3

    # bake: "NAME:MULT" on the CLI and in the tab, {"lora", "multiplier"} in the API
    baked = ck / "par-bake.safetensors"
    reports, files = _three_faces(
        faces, capsys, "bake", [ck / "base.safetensors", f"{out}:0.5", "-o", baked, "--overwrite"],
        {"checkpoint": "base", "loras": [{"lora": "par-ex", "multiplier": 0.5}], "output": "par-bake",
         "overwrite": True},
        {"checkpoint": "base.safetensors", "loras": "par-ex:0.5\n\n", "output": "par-bake", "overwrite": True},
        baked)
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["touched"] == 4 and reports[0]["loras"] == [
        {"path": str(out), "multiplier": 0.5, "layers": 4, "unmatched": 0}]
    assert files[0] == files[1] == files[2]

    # inspect
    reports, _ = _three_faces(faces, capsys, "inspect", [out], {"lora": "par-ex"}, {"lora": "par-ex.safetensors"},
                              None)
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["name"] == "par-ex.safetensors" and reports[0]["ranks"] == {"3": 3, "2": 1}
    assert reports[0]["metadata"]["ss_network_dim"] == "3"


def test_resize_merge_inspect_give_the_same_result_on_every_face(faces, capsys):
    ck, lo = faces["ck"], faces["lora"]
    # resize, every field away from its default
    out = lo / "par-rs.safetensors"
    reports, files = _three_faces(
        faces, capsys, "resize",
        [lo / "given.safetensors", "-o", out, "--rank", "2", "--dynamic-method", "sv_fro", "--dynamic-param", "0.9",
         "--dtype", "fp16", "--overwrite"],
        {"lora": "given", "output": "par-rs", "rank": 2, "dynamic_method": "sv_fro", "dynamic_param": 0.9,
         "dtype": "fp16", "overwrite": True},
        {"lora": "given.safetensors", "output": "par-rs.safetensors", "rank": 2.0, "dynamic_method": "sv_fro",
         "dynamic_param": 0.9, "dtype": "fp16", "device": "cpu", "overwrite": True},
        out)
    assert reports[0] == reports[1] == reports[2] and files[0] == files[1] == files[2]
    assert reports[0]["name"] == "par-rs.safetensors" and reports[0]["size_after"] < reports[0]["size_before"]
    assert {v.dtype for v in load_state_dict(out).values()} == {torch.float16}

    # merge: "NAME:W" on the CLI and in the tab, {"lora", "weight"} in the API; a rank and a checkpoint
    out = lo / "par-mg.safetensors"
    reports, files = _three_faces(
        faces, capsys, "merge",
        [f"{lo / 'given.safetensors'}:0.5", str(lo / "par-rs.safetensors"), "-o", out, "--rank", "2", "--model",
         ck / "base.safetensors", "--dtype", "fp32", "--svd", "full", "--overwrite"],
        {"loras": [{"lora": "given", "weight": 0.5}, {"lora": "par-rs"}], "output": "par-mg", "rank": 2,
         "model": "base", "dtype": "fp32", "svd": "full", "overwrite": True},
        {"loras": "given:0.5\npar-rs\n", "output": "par-mg", "rank": 2, "model": "base.safetensors",
         "dtype": "fp32", "device": "cpu", "svd": "full", "overwrite": True},
        out)
    assert reports[0] == reports[1] == reports[2] and files[0] == files[1] == files[2]
    assert [x["weight"] for x in reports[0]["inputs"]] == [0.5, 1.0]

    # inspect against a checkpoint
    reports, _ = _three_faces(faces, capsys, "inspect", [out, "--model", ck / "base.safetensors"],
                              {"lora": "par-mg", "model": "base"},
                              {"lora": "par-mg.safetensors", "model": "base.safetensors"}, None)
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["model"] == "base.safetensors" and reports[0]["not_applied"] == []
    assert sum(b["layers"] for b in reports[0]["blocks"].values()) == sum(reports[0]["targets"].values())


def test_cli_prints_a_summary_unless_json(faces, capsys):
    ck, lo = faces["ck"], faces["lora"]
    capsys.readouterr()
    assert cli.main(["lora", "extract", str(ck / "tuned.safetensors"), str(ck / "base.safetensors"), "-o",
                     str(lo / "cli-ex"), "--rank", "2", "-q"]) == 0
    text = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in text.splitlines())  # a name/value table
    assert (rows["architecture"], rows["layers"], rows["rank"]) == ("SD1", "3", "2")  # the 3x3 conv needs --conv-rank
    assert (lo / "cli-ex.safetensors").is_file()
    assert cli.main(["lora", "inspect", str(lo / "cli-ex.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "base model : SD1" in text and "ranks      : 2 x3" in text
    # the request's checks are the CLI's: a rank below 1 and a quantile above 1 exit 2 naming the field
    assert cli.main(["lora", "extract", "a", "b", "-o", "x", "--rank", "0"]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err
    assert cli.main(["lora", "extract", "a", "b", "-o", "x", "--clamp-quantile", "1.5"]) == 2
    assert "--clamp-quantile must be <= 1" in capsys.readouterr().err  # the flag, as the user typed it
    # an output named with another model suffix is refused, never renamed to x.ckpt.safetensors
    assert cli.main(["lora", "bake", str(ck / "base.safetensors"), str(lo / "cli-ex.safetensors"), "-o",
                     str(ck / "cli-bake.ckpt"), "-q"]) == 2
    assert "written as .safetensors, not ckpt" in capsys.readouterr().err
    assert not list(ck.glob("cli-bake*"))


def test_tab_translations():
    from lib_sdtoolkit.errors import InvalidInputError
    from lib_sdtoolkit.jobs.lora import BakeRequest, ExtractRequest
    from lib_sdtoolkit.ui.lora_tab import lora_request

    req = lora_request("extract", {"tuned": "t", "base": "b", "output": "o", "rank": 8.0, "conv_rank": 0.0,
                                   "clamp_quantile": 1, "device": "cpu", "dtype": "bf16", "overwrite": False})
    assert isinstance(req, ExtractRequest) and req.conv_rank is None and req.rank == 8 and req.dtype == "bf16"
    req = lora_request("bake", {"checkpoint": "c", "loras": " a:0.25\nsub/b v2\n\n", "output": "o",
                                "overwrite": False})
    assert isinstance(req, BakeRequest)
    assert req.loras == [{"lora": "a", "multiplier": 0.25}, {"lora": "sub/b v2", "multiplier": 1.0}]
    with pytest.raises(InvalidInputError, match="at least one LoRA"):
        lora_request("bake", {"checkpoint": "c", "loras": "\n", "output": "o"})
    with pytest.raises(InvalidInputError, match="dtype 'fp8' is not one of"):
        lora_request("extract", {"tuned": "t", "base": "b", "output": "o", "dtype": "fp8"})


def test_tab_refresh_and_writes_update_the_lists(faces):
    import shutil

    import gradio as gr

    from lib_sdtoolkit.ui import lora_tab

    host, lo, ck = faces["host"], faces["lora"], faces["ck"]
    with gr.Blocks() as demo:
        lora_tab.build(host)
    cfg = demo.get_config_file()

    def comp(elem_id):
        found = [c for c in cfg["components"] if c["props"].get("elem_id") == elem_id]
        assert len(found) == 1, elem_id
        return found[0]

    def fn(elem_id):
        cid = comp(elem_id)["id"]
        for i, dep in enumerate(demo.dependencies):
            if cid in [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]:
                return demo.fns[i].fn
        raise AssertionError(f"no event wired to {elem_id}")

    def names(update):
        return [c[0] if isinstance(c, (list, tuple)) else c for c in update["choices"]]

    assert "fresh.safetensors" not in json.dumps(comp("sdtoolkit_lora_inspect_file")["props"]["choices"])
    shutil.copyfile(ck / "base.safetensors", ck / "fresh.safetensors")
    shutil.copyfile(ck / "base.safetensors", lo / "not-a-lora-but-listed.safetensors")
    # the LoRA lists (inspect, resize) then the checkpoint lists (tuned, base, bake, inspect's, merge's)
    ups = fn("sdtoolkit_lora_refresh")("given.safetensors", None, "tuned.safetensors", "base.safetensors", None,
                                       None, "base.safetensors")
    assert len(ups) == 7 and all("not-a-lora-but-listed.safetensors" in names(u) for u in ups[:2])
    assert ups[0]["value"] == "given.safetensors" and ups[2]["value"] == "tuned.safetensors"
    assert all("fresh.safetensors" in names(u) for u in ups[2:]) and ups[4]["value"] is None
    assert ups[6]["value"] == "base.safetensors"

    class NoProgress:
        def __call__(self, *a, **k):
            pass

    # Extract's button: the values arrive in bind()'s order, the new LoRA is listed and picked for Inspect
    out = fn("sdtoolkit_lora_extract_btn")(NoProgress(), None, "tuned.safetensors", "base.safetensors", 2, 0, 1.0,
                                           "cpu", "fp32", "tab-ex.safetensors", False)
    assert "sdtoolkit-ok" in out[0] and "Wrote tab-ex.safetensors" in out[0]
    assert out[1]["value"] == "tab-ex.safetensors" and "tab-ex.safetensors" in names(out[1])
    assert load_state_dict(lo / "tab-ex.safetensors")[
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight"].dtype == torch.float32
    # Bake's button: the new checkpoint appears in the three checkpoint lists, the choices made are kept
    out = fn("sdtoolkit_lora_bake_btn")(NoProgress(), "tuned.safetensors", None, "base.safetensors",
                                        "tab-ex:1", "tab-bake", False)
    assert "sdtoolkit-ok" in out[0] and all("tab-bake.safetensors" in names(u) for u in out[1:])
    assert [u["value"] for u in out[1:]] == ["tuned.safetensors", None, "base.safetensors"]
    # Resize's and Merge's buttons: the new LoRA is listed and picked for Inspect
    out = fn("sdtoolkit_lora_resize_btn")(NoProgress(), None, "tab-ex.safetensors", 1, "fixed", 0.9, "keep", "cpu",
                                          "tab-rs.safetensors", False)
    assert "sdtoolkit-ok" in out[0] and "Wrote tab-rs.safetensors" in out[0] and out[1]["value"] == "tab-rs.safetensors"
    assert load_state_dict(lo / "tab-rs.safetensors")[
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight"].shape[1] == 1
    out = fn("sdtoolkit_lora_merge_btn")(NoProgress(), None, "tab-ex:0.5\ngiven\n", 0, None, "fp16", "cpu",
                                         "tab-mg", False)
    assert "sdtoolkit-ok" in out[0] and out[1]["value"] == "tab-mg.safetensors"
    assert load_state_dict(lo / "tab-mg.safetensors")[
        "lora_te_text_model_encoder_layers_3_mlp_fc1.lora_up.weight"].dtype == torch.float16
    # Inspect's button: tables with a bar per block (no JSON dump), and an error shown in the tab
    page = fn("sdtoolkit_lora_inspect_btn")("tab-ex.safetensors", None)
    assert "<table" in page and "sdtoolkit-bar" in page and "IN01" in page and "{" not in page
    assert "Every module would be applied" in page
    page = fn("sdtoolkit_lora_inspect_btn")("tab-ex.safetensors", "base.safetensors")
    assert "Checked against" in page and "base.safetensors" in page
    assert "sdtoolkit-error" in fn("sdtoolkit_lora_inspect_btn")(None, None)


INPUT_FIELDS = [  # (action, field, a valid body without that field)
    ("extract", "tuned", {"base": "base", "output": "gate-out"}),
    ("extract", "base", {"tuned": "tuned", "output": "gate-out"}),
    ("bake", "checkpoint", {"loras": [{"lora": "given"}], "output": "gate-out"}),
    ("bake", "loras", {"checkpoint": "base", "output": "gate-out"}),
    ("inspect", "lora", {}),
    ("inspect", "model", {"lora": "given"}),
    ("resize", "lora", {"rank": 1, "output": "gate-out"}),
    ("merge", "loras", {"output": "gate-out"}),
    ("merge", "model", {"loras": ["given"], "output": "gate-out"}),
]


def _gate_body(field, value, body):
    return {**body, field: [{"lora": value}] if field == "loras" else value}  # bake's and merge's form alike


def _no_gate_output(faces):
    assert not [p for p in faces["root"].parent.rglob("gate-*")]


@pytest.mark.parametrize("action,field,body", INPUT_FIELDS)
def test_routes_gate_every_input_name(faces, tuned, action, field, body):
    c = faces["client"]
    outside = str(tuned[1])  # an existing model file outside the model folders
    for value, status in (("../models/Stable-diffusion/base.safetensors", 403), (outside, 403),
                          ("Stable-diffusion/../../x.safetensors", 403), ("no-such-model", 404)):
        r = c.post(f"/sdtoolkit/v1/lora/{action}", json=_gate_body(field, value, body))
        assert r.status_code == status, (value, r.text)
        assert isinstance(r.json()["detail"], str)
    _no_gate_output(faces)


@pytest.mark.parametrize("action,body", [
    ("extract", {"tuned": "tuned", "base": "base", "output": "gate-x"}),
    ("bake", {"checkpoint": "base", "loras": [{"lora": "given"}], "output": "gate-x"}),
    ("inspect", {"lora": "given"}),
    ("resize", {"lora": "given", "rank": 1, "output": "gate-x"}),
    ("merge", {"loras": [{"lora": "given"}], "output": "gate-x"}),
])
def test_routes_refuse_unknown_fields_and_outputs_elsewhere(faces, action, body):
    c = faces["client"]
    r = c.post(f"/sdtoolkit/v1/lora/{action}", json={**body, "rnak": 4})
    assert r.status_code == 422 and "rnak" in r.text
    if "output" in body:  # outputs are plain file names in the kind's folder
        for out in ("../gate-up.safetensors", str(faces["root"].parent / "gate-abs.safetensors"), "sub/gate-s"):
            r = c.post(f"/sdtoolkit/v1/lora/{action}", json={**body, "output": out})
            assert r.status_code == 422 and "plain file name" in r.json()["detail"], r.text
    if action == "merge":
        for item, msg in (({"lora": "given", "multiplier": 1}, "unknown field"), ({"weight": 1}, "lora is required"),
                          ({"lora": "given", "weight": "x"}, "must be a number")):
            r = c.post("/sdtoolkit/v1/lora/merge", json={**body, "loras": [item]})
            assert r.status_code == 422 and msg in r.json()["detail"], r.text
    if action == "bake":
        for item, msg in (({"lora": "given", "weight": 1}, "unknown field"), ({"multiplier": 1}, "lora is required"),
                          ({"lora": "given", "multiplier": "x"}, "must be a number"), (3, "must be")):
            r = c.post("/sdtoolkit/v1/lora/bake", json={**body, "loras": [item]})
            assert r.status_code == 422 and msg in r.json()["detail"], r.text
    _no_gate_output(faces)


def test_every_lora_job_reaches_the_cli_and_the_api_and_help_is_torch_free(faces):
    """A LoRA job added to jobs.lora.ACTIONS gets its CLI sub-command and its route with no other change."""
    import subprocess
    import sys

    from lib_sdtoolkit import jobs
    from lib_sdtoolkit.jobs.lora import ACTIONS

    paths = {r.path for r in faces["client"].app.routes}
    for action, spec in ACTIONS.items():
        assert jobs.get(spec.name) is spec
        assert f"/sdtoolkit/v1/lora/{action}" in paths
        with pytest.raises(SystemExit) as exc:
            cli.main(["lora", action, "--help"])
        assert exc.value.code == 0
    code = ("import sys, argparse\n"
            "from lib_sdtoolkit.lora import cli\n"
            "p = argparse.ArgumentParser(); cli.register(p.add_subparsers())\n"
            "for a in sys.argv[1:]:\n"
            "    try:\n"
            "        p.parse_args(['lora', a, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code, *ACTIONS], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
