"""Merge in memory in the WebUI: the extension's scripts loaded through the WebUI double, a loaded ``sd_model`` whose
UNet / VAE / CLIP are the real tiny modules (ldm UNetModel, ldm AutoencoderKL layout, transformers CLIPTextModel)
loaded from checkpoint A and hijacked the way the WebUI hijacks it. Every expected value is computed here in plain
torch from the checkpoint files; saved files are compared with what ``merge`` on the CLI writes."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(DOUBLE) not in sys.path:
    sys.path.append(str(DOUBLE))  # appended: webui_harness.use_double() puts it first when `modules` is needed

from lib_sdtoolkit.errors import ArchitectureError  # noqa: E402
from lib_sdtoolkit.host import ModelHooks, StandaloneHost, WebUIHost  # noqa: E402
from sd1_webui_model import load_sd1  # noqa: E402  (the loaded SD1 sd_model, shared with test_merge_grid_webui)
from sd1_webui_model import plain_state as _plain_state  # noqa: E402

MERGE = "/sdtoolkit/v1/merge"
POS = "embeddings.position_ids"
TOKEN_EMB = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


# ----------------------------------------------------------------------------------------- helpers
def _ws(a: torch.Tensor, b: torch.Tensor, m: float) -> torch.Tensor:
    return a.float() * (1 - m) + b.float() * m


def _files_under(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _raw(path: Path) -> Dict[str, bytes]:
    """Each tensor's stored bytes, dtype and shape (byte-identical comparison)."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()
                      if t.numel() else b"")
    return out


def _meta(path: Path) -> Dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _find_fn(demo: Any, elem_id: str):
    """The backend function wired to the click of the component with ``elem_id`` (gradio 3 and 4 layouts)."""
    cfg = demo.get_config_file()
    ids = [c["id"] for c in cfg["components"] if c["props"].get("elem_id") == elem_id]
    assert len(ids) == 1, elem_id
    for i, dep in enumerate(demo.dependencies):
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]
        if ids[0] in targets:
            return demo.fns[i].fn
    raise AssertionError(f"no event wired to {elem_id}")


def _visible(demo: Any, elem_id: str) -> bool:
    comps = [c for c in demo.get_config_file()["components"] if c["props"].get("elem_id") == elem_id]
    assert len(comps) == 1, elem_id
    return comps[0]["props"].get("visible", True) is not False


class _NoProgress:
    def __call__(self, *args: Any, **kwargs: Any) -> None:
        pass


# ----------------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from lib_sdtoolkit.samples import factory

    data = tmp_path_factory.mktemp("webui_merge_data")
    ck = data / "models" / "Stable-diffusion"
    ck.mkdir(parents=True)
    a_path = factory.write_checkpoint(ck / "A.safetensors", "SD1", seed=1)  # fp32 files, fp16 loaded model
    b_path = factory.write_checkpoint(ck / "B.safetensors", "SD1", seed=2)

    from webui_harness import WebUIDouble

    w = WebUIDouble(str(ROOT), str(data))
    w.preload([])
    w.load_scripts()
    from modules import script_callbacks, sd_models, shared

    # the WebUI's load_model: build, load_model_weights (load_state_dict strict=False), half(), hijack
    model, info = load_sd1(a_path, half=True)
    old_model = shared.sd_model
    shared.sd_model = model
    loaded_calls: List[Any] = []
    script_callbacks.on_model_loaded(lambda m: loaded_calls.append(m))
    sd_models.list_models()

    demo, _ = w.create_ui()
    client = TestClient(w.start_app(demo))
    A, B = load_file(str(a_path)), load_file(str(b_path))
    # the loaded model really holds A (every checkpoint key the modules have), in fp16
    plain = _plain_state(model)
    assert TOKEN_EMB in plain and len(plain) > 100
    for k, v in plain.items():
        assert torch.equal(v, A[k].half()), k
    yield dict(w=w, model=model, info=info, demo=demo, client=client, A=A, B=B, a=a_path, b=b_path, ck=ck,
               data=data, loaded_calls=loaded_calls)
    shared.sd_model = old_model
    script_callbacks.clear_callbacks()


# ----------------------------------------------------------------------------------------- tests
def test_tab_shows_the_in_memory_buttons_in_the_webui(env):
    for elem in ("sdtoolkit_merge_in_memory", "sdtoolkit_merge_save_current", "sdtoolkit_merge_restore"):
        assert _visible(env["demo"], elem), elem
    assert env["w"].reported_errors == []


def test_merge_into_loaded_model_through_the_tab_writes_no_file(env, tmp_path):
    model, A, B = env["model"], env["A"], env["B"]
    before = _files_under(env["data"])
    # a LoRA applied by the Lora extension left its weight backup on a layer: stale once the weights are replaced
    conv = model.model.diffusion_model.out[2]
    conv.network_current_names, conv.network_weights_backup = (("lora", 1.0, 1.0, None),), conv.weight.clone()
    conv.network_bias_backup = conv.bias.clone()
    fn = _find_fn(env["demo"], "sdtoolkit_merge_in_memory")
    # gradio passes the gr.Progress first (it is the parameter before *values)
    status, text, report = fn(_NoProgress(), "A.safetensors", "B.safetensors", "", "weighted_sum", 0.3, 0.2, "",
                              "", "fp16", False, False, "None", "", 0, "cpu", False, "", False)
    assert report is not None, text
    assert report["in_memory"] is True and report["output"] is None
    assert _files_under(env["data"]) == before                      # nothing written (no tmp file left either)

    plain = _plain_state(model)
    for k, v in plain.items():
        if k.endswith(POS) or not A[k].is_floating_point():
            assert torch.equal(v, A[k]), k
            continue
        assert v.dtype == torch.float16, k
        assert torch.equal(v, _ws(A[k], B[k], 0.3).to(torch.float16)), k
    assert not torch.equal(plain[TOKEN_EMB], A[TOKEN_EMB].half())  # the CLIP behind the hijack was merged too
    assert (conv.network_current_names, conv.network_weights_backup, conv.network_bias_backup) == ((), None, None)

    from modules import sd_hijack

    assert type(model.cond_stage_model) is sd_hijack.FrozenCLIPEmbedderWithCustomWords  # hijacked again
    # the WebUI is told: a checkpoint_info stand-in (sha256 of the merge metadata), model-loaded callbacks
    ci = model.sd_checkpoint_info
    assert ci is not env["info"] and ci.filename == str(env["a"]) and model.sd_model_checkpoint == str(env["a"])
    assert ci.sha256 == report["sha256"] and model.sd_model_hash == ci.shorthash == report["sha256"][:10]
    assert ci.sha256 == hashlib.sha256(json.dumps(ci.metadata, sort_keys=True).encode()).hexdigest()
    rec = json.loads(ci.metadata["sd_merge_recipe"])
    assert (rec["primary_model_hash"], rec["secondary_model_hash"]) == (_sha(env["a"]), _sha(env["b"]))
    assert rec["interp_method"] == "Weighted sum" and rec["multiplier"] == 0.3
    assert ci.title == f"{report['name']}.safetensors [{ci.shorthash}]"
    assert env["loaded_calls"] == [model]
    # the WebUI would not reload A when A is picked again: same file, stand-in kept
    from modules import sd_models

    assert sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(env["a"]))) is model
    assert model.sd_checkpoint_info is ci


def test_save_current_merge_through_the_tab_equals_the_cli_and_is_listed(env, tmp_path):
    from lib_sdtoolkit.cli import main
    from modules import sd_models

    assert "saved.safetensors" not in sd_models.checkpoint_aliases
    merge = _find_fn(env["demo"], "sdtoolkit_merge_in_memory")
    assert merge(_NoProgress(), "A.safetensors", "B.safetensors", "", "weighted_sum", 0.3, 0.2, "", "", "fp16",
                 False, False, "None", "", 0, "cpu", False, "", False)[2] is not None
    fn = _find_fn(env["demo"], "sdtoolkit_merge_save_current")
    out = fn("saved.safetensors", False, "A.safetensors", "B.safetensors", "", "None", progress=_NoProgress())
    status, text, report = out[:3]
    assert report is not None, text
    saved = env["ck"] / "saved.safetensors"
    assert Path(report["output"]) == saved and saved.is_file()
    # the checkpoint refresher ran: the WebUI's list has the file, and the tab's dropdowns offer it
    assert sd_models.checkpoint_aliases["saved.safetensors"].filename == str(saved)
    assert "saved.safetensors" in out[3]["choices"] and out[3]["value"] == "A.safetensors"

    cli_out = tmp_path / "saved.safetensors"                      # same stem: same custom_name in the metadata
    assert main(["merge", str(env["a"]), str(env["b"]), "-o", str(cli_out), "--alpha", "0.3"]) == 0
    assert _raw(saved) == _raw(cli_out)                              # byte-identical tensors
    meta, cli_meta = _meta(saved), _meta(cli_out)
    rec, cli_rec = json.loads(meta["sd_merge_recipe"]), json.loads(cli_meta["sd_merge_recipe"])
    assert rec == cli_rec, {k: (rec.get(k), cli_rec.get(k)) for k in set(rec) | set(cli_rec) if rec.get(k) != cli_rec.get(k)}
    assert meta["sd_merge_models"] == cli_meta["sd_merge_models"]
    assert (rec["primary_model_hash"], rec["secondary_model_hash"]) == (_sha(env["a"]), _sha(env["b"]))
    models = json.loads(meta["sd_merge_models"])
    assert {v["name"] for v in models.values()} == {"A.safetensors", "B.safetensors"}
    # and against the formula, independently of both
    A, B, got = env["A"], env["B"], load_file(str(saved))
    for k, v in got.items():
        if k.endswith(POS) or not A[k].is_floating_point():
            assert torch.equal(v, A[k]), k
        else:
            assert torch.equal(v, _ws(A[k], B[k], 0.3).to(torch.float16)), k


def test_api_in_memory_save_current_and_restore(env):
    c, model, A, B = env["client"], env["model"], env["A"], env["B"]
    before = _files_under(env["data"])
    r = c.post(MERGE, json=dict(model_a="A", model_b="B", alpha=0.6, in_memory=True))
    assert r.status_code == 200, r.text
    assert r.json()["in_memory"] is True and _files_under(env["data"]) == before
    plain = _plain_state(model)
    for k in (TOKEN_EMB, "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
              "first_stage_model.decoder.conv_out.weight"):
        assert torch.equal(plain[k], _ws(A[k], B[k], 0.6).to(torch.float16)), k
    cur = c.get(MERGE + "/current").json()
    assert cur["supported"] and cur["loaded"] and cur["current_merge"]["sha256"] == r.json()["sha256"]
    assert cur["loaded_file"] == "A.safetensors"

    from modules import sd_models

    r = c.post(MERGE + "/save-current", json={"output": "api_saved"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "api_saved.safetensors" and "api_saved.safetensors" in sd_models.checkpoint_aliases
    got = load_file(str(env["ck"] / "api_saved.safetensors"))
    assert torch.equal(got[TOKEN_EMB], _ws(A[TOKEN_EMB], B[TOKEN_EMB], 0.6).to(torch.float16))
    r = c.post(MERGE + "/save-current", json={"output": "api_saved.safetensors"})
    assert r.status_code == 409 and "exists" in r.json()["detail"]
    r = c.post(MERGE + "/save-current", json={"output": "../x.safetensors"})
    assert r.status_code == 422

    n_calls = len(env["loaded_calls"])
    r = c.post(MERGE + "/restore-loaded")
    assert r.status_code == 200, r.text
    assert r.json()["restored"] == "A.safetensors"
    plain = _plain_state(model)
    for k, v in plain.items():
        assert torch.equal(v, A[k].half()), k
    assert model.sd_checkpoint_info.title.startswith("A.safetensors")
    assert len(env["loaded_calls"]) == n_calls + 1                  # the WebUI's reload fired its callbacks
    assert c.get(MERGE + "/current").json()["current_merge"] is None
    r = c.post(MERGE + "/save-current", json={})
    assert r.status_code == 422 and "no in-memory merge" in r.json()["detail"]


def test_loading_other_weights_forgets_the_merge(env):
    from modules import sd_models

    c, model = env["client"], env["model"]
    assert c.post(MERGE, json=dict(model_a="A", model_b="B", alpha=0.5, in_memory=True)).status_code == 200
    assert c.get(MERGE + "/current").json()["current_merge"] is not None
    sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(env["b"])))   # the user picks B
    assert c.get(MERGE + "/current").json()["current_merge"] is None
    assert c.post(MERGE + "/save-current", json={"output": "stale"}).status_code == 422
    assert not (env["ck"] / "stale.safetensors").exists()
    sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(env["a"])))


def test_a_hijacked_model_without_the_face_hooks_is_refused_unchanged(env):
    """Without undoing the hijack the CLIP keys do not match: refused before any tensor is written."""
    from lib_sdtoolkit import jobs

    model = env["model"]
    before = _plain_state(model)
    host = WebUIHost(env["data"] / "models", model_hooks=ModelHooks(get_model=lambda: model))
    with pytest.raises(ArchitectureError, match="no tensor for"):
        jobs.run("merge", host, dict(model_a="A", model_b="B", alpha=0.3, in_memory=True))
    after = _plain_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_standalone_app_hides_the_in_memory_buttons(tmp_path):
    from lib_sdtoolkit.server import make_router
    from lib_sdtoolkit.ui import build_app
    from lib_sdtoolkit.samples import factory
    from fastapi import FastAPI

    host = StandaloneHost(models_dir=tmp_path / "models", create=True)
    assert host.loaded_model() is None and not host.has_loaded_model_support
    demo = build_app(host)
    for elem in ("sdtoolkit_merge_in_memory", "sdtoolkit_merge_save_current", "sdtoolkit_merge_restore"):
        assert not _visible(demo, elem), elem
    assert _visible(demo, "sdtoolkit_merge_run")
    ck = tmp_path / "models" / "Stable-diffusion"
    factory.write_checkpoint(ck / "A.safetensors", "SD1", seed=1)
    factory.write_checkpoint(ck / "B.safetensors", "SD1", seed=2)
    app = FastAPI()
    app.include_router(make_router(host, strict=True))
    c = TestClient(app)
    r = c.post(MERGE, json=dict(model_a="A", model_b="B", alpha=0.3, in_memory=True))
    assert r.status_code == 422 and "in memory" in r.json()["detail"]
    assert c.post(MERGE + "/save-current", json={}).status_code == 422
    assert c.get(MERGE + "/current").json() == {"supported": False, "loaded": False, "loaded_file": None,
                                                "current_merge": None}
    assert sorted(os.listdir(ck)) == ["A.safetensors", "B.safetensors"]


def test_weights_do_not_change_while_a_generation_holds_the_queue_lock(env):
    import threading

    from modules import call_queue

    c, model, A, B = env["client"], env["model"], env["A"], env["B"]
    k = "model.diffusion_model.out.2.weight"
    start = _plain_state(model)[k]
    answers: List[Any] = []
    with call_queue.queue_lock:                                     # a generation is running
        t = threading.Thread(target=lambda: answers.append(
            c.post(MERGE, json=dict(model_a="A", model_b="B", alpha=0.9, in_memory=True))))
        t.start()
        t.join(timeout=1.5)
        assert t.is_alive() and answers == []
        assert torch.equal(model.model.diffusion_model.out[2].weight.detach(), start)
    t.join(timeout=120)
    assert answers and answers[0].status_code == 200, answers
    assert torch.equal(_plain_state(model)[k], _ws(A[k], B[k], 0.9).to(torch.float16))


class _SamplingReached(Exception):
    """Raised by the test sampler: everything before sampling (before_process, the WebUI's checkpoint reload,
    process) ran; what the loaded weights are is all these tests need."""


def _generate_until_sampling(model) -> None:
    """A txt2img generation as the WebUI runs it (process_images: scripts' before_process, then
    reload_model_weights() on the checkpoint the option names), stopped when it starts sampling."""
    from contextlib import closing

    from modules import processing, scripts
    from modules.api import api

    runner = scripts.scripts_txt2img
    api._ensure_ui(runner, False)
    p = processing.StableDiffusionProcessingTxt2Img(model, runner, api.init_default_script_args(runner))

    def sample(*a, **k):
        raise _SamplingReached()

    p.sample = sample
    with closing(p), pytest.raises(_SamplingReached):
        processing.process_images(p)


def test_options_and_checkpoint_info_name_the_merged_model_until_restore(env):
    """Issue 10, defect 7: after an in-memory merge /sdapi/v1/options named the original checkpoint. A1111 names the
    model it loads in the sd_model_checkpoint option (load_model_weights writes the checkpoint's title there), and
    every generation reloads the checkpoint that option names (select_checkpoint via checkpoint_aliases)."""
    from modules import sd_models, shared

    c, model, A, B = env["client"], env["model"], env["A"], env["B"]
    api = TestClient(env["w"].start_app(env["demo"], api=True))
    a_title = api.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert sd_models.checkpoint_aliases[a_title].filename == str(env["a"])
    k = "model.diffusion_model.out.2.weight"

    r = c.post(MERGE, json=dict(model_a="A", model_b="B", alpha=0.4, in_memory=True))
    assert r.status_code == 200, r.text
    title = api.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    ci = model.sd_checkpoint_info
    assert title == ci.title == f"{r.json()['name']}.safetensors [{r.json()['sha256'][:10]}]" != a_title
    assert title in [m["title"] for m in api.get("/sdapi/v1/sd-models").json()]
    merged = _ws(A[k], B[k], 0.4).to(torch.float16)

    n_loads = len(env["loaded_calls"])
    _generate_until_sampling(model)                                   # the option resolves to the merged weights
    assert torch.equal(_plain_state(model)[k], merged) and len(env["loaded_calls"]) == n_loads
    assert shared.opts.data["sd_model_checkpoint"] == title and model.sd_checkpoint_info is ci

    sd_models.list_models()                                           # "refresh checkpoints" drops the stand-in
    assert title not in sd_models.checkpoint_aliases
    _generate_until_sampling(model)                                   # ... and a generation does not fall back
    assert torch.equal(_plain_state(model)[k], merged) and len(env["loaded_calls"]) == n_loads
    assert sd_models.checkpoint_aliases[title] is ci

    r = c.post(MERGE + "/restore-loaded")
    assert r.status_code == 200, r.text
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model.sd_checkpoint_info.title
    assert sd_models.checkpoint_aliases[model.sd_checkpoint_info.title].filename == str(env["a"])
    assert title not in sd_models.checkpoint_aliases and title not in sd_models.checkpoints_list
    assert torch.equal(_plain_state(model)[k], A[k].half())

    # merged again, then the user loads B: the merge's name leaves the list with it
    assert c.post(MERGE, json=dict(model_a="A", model_b="B", alpha=0.7, in_memory=True)).status_code == 200
    title2 = shared.opts.data["sd_model_checkpoint"]
    assert title2 in sd_models.checkpoints_list
    sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(env["b"])))
    assert shared.opts.data["sd_model_checkpoint"].startswith("B.safetensors")
    assert title2 not in sd_models.checkpoints_list and title2 not in sd_models.checkpoint_aliases
    sd_models.reload_model_weights(model, sd_models.CheckpointInfo(str(env["a"])))
