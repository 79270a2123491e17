"""scripts/sdtoolkit_lora.py in the WebUI double: scripts/*.py loaded the way the WebUI loads them, ``on_before_ui``
registration with and without a built-in Lora extension, and generations run through the double's
``process_images`` (prompt parsing, ``extra_networks.activate``/``deactivate``, text encoder, sampling, decoding).

The model is an SD1 ``sd_model`` with the WebUI's attribute layout around the REAL tiny ldm UNet and transformers CLIP
from lib_sdtoolkit.samples.factory, hijacked as the WebUI hijacks it (the text encoder and its token embedding
wrapped in ``.wrapped`` modules). The SDXL test uses sgm's layout (``conditioner.embedders[0/1].wrapped``: CLIP-L
in transformers, OpenCLIP-G as torch ``nn.MultiheadAttention`` blocks under OpenCLIP's names) around the factory's
diffusers-built SDXL UNet (no sgm package here) at ``model.diffusion_model``. Expected weights are computed here
with plain torch from the published formula W' = W + mult · alpha/rank · up @ down, in float64, from the file's
tensors and the key map of the reference (diffusers-style kohya names -> ldm modules), never from the library's own
output."""
from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lib_sdtoolkit.files import save_safetensors

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "webui_double"
if str(DOUBLE) not in sys.path:
    sys.path.append(str(DOUBLE))

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."
#: file module name -> (checkpoint weight key, rank, alpha) - the mapping written out by hand from the reference
STYLE = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", 4, 2.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": (UNET + "input_blocks.1.0.in_layers.2.weight", 4, 4.0),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (UNET + "input_blocks.1.1.proj_in.weight", 2, 1.0),
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v":
        (UNET + "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight", 4, 4.0),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (TE + "text_model.encoder.layers.0.self_attn.q_proj.weight",
                                                             4, 4.0),
}
OTHER = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2":
         (UNET + "middle_block.1.transformer_blocks.0.ff.net.2.weight", 3, 3.0)}
SEQ = 8
#: the double's built-in Lora extension (extensions-builtin/Lora): lazy weight merging from its own CPU backup
BUILTIN_LORA = DOUBLE / "extensions-builtin" / "Lora"


# ------------------------------------------------------------------ the WebUI's sd_model layout (ldm + sd_hijack)
class EmbeddingsWithFixes(nn.Module):          # modules/sd_hijack.py: wraps token_embedding as .wrapped
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids):
        return self.wrapped(input_ids)


class FrozenCLIPEmbedder(nn.Module):           # ldm.modules.encoders.modules: .transformer = CLIPTextModel
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class FrozenCLIPEmbedderWithCustomWords(nn.Module):   # modules/sd_hijack_clip.py: the original as .wrapped
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        vocab = self.wrapped.transformer.config.vocab_size
        rows = []
        for t in texts:   # a deterministic stand-in for the tokenizer: BOS, characters, EOS padding
            ids = [vocab - 2] + [ord(c) % (vocab - 2) for c in t][:SEQ - 2]
            rows.append(ids + [vocab - 1] * (SEQ - len(ids)))
        return self.wrapped.transformer(input_ids=torch.tensor(rows)).last_hidden_state


class DiffusionWrapper(nn.Module):             # ldm.models.diffusion.ddpm.DiffusionWrapper
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class LatentDiffusion(nn.Module):
    is_sdxl = False
    is_sd2 = False
    is_sd1 = True

    def __init__(self, unet, text_encoder, vae):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        emb = text_encoder.text_model.embeddings
        emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding)
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedder(text_encoder))
        self.first_stage_model = vae
        self.scale_factor = 0.18215
        self.seen_prompts = []

    def get_learned_conditioning(self, prompts):
        self.seen_prompts.append(list(prompts))
        return self.cond_stage_model(prompts)

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


def checkpoint_state(model):
    """Live parameters under their checkpoint keys (the hijack's ``wrapped`` components removed by hand)."""
    return {k.replace("wrapped.", ""): v for k, v in model.state_dict().items()}


def lora_file(path, spec, seed, nan_in=None):
    g = torch.Generator().manual_seed(seed)
    sd, shapes = {}, {}
    for name, (key, rank, alpha) in spec.items():
        shapes[name] = key
        w = MODEL_SHAPES[key]
        if len(w) == 4:
            down, up = (rank, w[1], w[2], w[3]), (w[0], rank, 1, 1)
        else:
            down, up = (rank, w[1]), (w[0], rank)
        sd[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        if name == nan_in:
            sd[f"{name}.lora_up.weight"][0, 0] = float("nan")
    return save_safetensors(path, sd), sd


def expected(base, sd, spec, te_mult, unet_mult):
    """Plain-torch W' for every target of ``spec`` (float64 maths, compared with tolerance)."""
    out = {}
    for name, (key, rank, alpha) in spec.items():
        up = sd[f"{name}.lora_up.weight"].double().reshape(-1, rank)
        down = sd[f"{name}.lora_down.weight"].double().reshape(rank, -1)
        mult = te_mult if key.startswith("cond_stage_model.") else unet_mult
        w = base[key].double()
        out[key] = (w + mult * (alpha / rank) * (up @ down).reshape(w.shape)).float()
    return out


MODEL_SHAPES = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()                       # our hash cache in this test's own folder, never a shared one
    mp.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path_factory.mktemp("sdt-cache")))
    from webui_harness import WebUIDouble
    from lib_sdtoolkit.samples import factory

    mods = factory.build_modules("SD1", "tiny", seed=0)
    model = LatentDiffusion(mods["unet"], mods["text_encoder"], mods["vae"]).eval()
    base = {k: v.clone() for k, v in checkpoint_state(model).items()}
    mods = factory.build_modules("SD1", "tiny", seed=0)     # an independent copy for reference outputs
    ref = LatentDiffusion(mods["unet"], mods["text_encoder"], mods["vae"]).eval()
    assert all(torch.equal(v, base[k]) for k, v in checkpoint_state(ref).items())
    MODEL_SHAPES.update({k: tuple(v.shape) for k, v in base.items()})
    data = tmp_path_factory.mktemp("webui-data")
    w = WebUIDouble(str(ROOT), str(data))
    w.preload([])
    lora_dir = data / "models" / "Lora"
    (lora_dir / "sub dir").mkdir(parents=True)
    files = {}
    files["style"] = lora_file(lora_dir / "style.safetensors", STYLE, 1)
    files["other"] = lora_file(lora_dir / "sub dir" / "other.safetensors", OTHER, 2)
    lora_file(lora_dir / "nan.safetensors", STYLE, 3, nan_in="lora_unet_down_blocks_0_resnets_0_conv1")
    good = (lora_dir / "style.safetensors").read_bytes()
    (lora_dir / "broken.safetensors").write_bytes(good[: len(good) // 2])
    from modules import shared

    old = shared.sd_model
    shared.sd_model = model
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield types.SimpleNamespace(webui=w, model=model, base=base, files=files, builtin_dir=BUILTIN_LORA,
                                lora_dir=lora_dir, ref=ref)
    _unload()                       # the built-in's torch patches off before other test modules run
    mp.undo()
    torch.set_num_threads(n)
    shared.sd_model = old


def start(env, with_builtin):
    """A WebUI start: load scripts (built-in extensions first), clear the extra-network registry and the
    extra-networks pages, run before_ui (in the WebUI's order: reverse registration)."""
    from modules import extra_networks, script_callbacks, scripts, ui_extra_networks

    _unload()
    scripts.extension_dirs[:] = ([str(env.builtin_dir)] if with_builtin else []) + [str(ROOT)]
    loaded = scripts.load_scripts()
    assert env.webui.reported_errors == []
    ui_extra_networks.initialize()
    extra_networks.initialize()
    script_callbacks.before_ui_callback()
    assert env.webui.reported_errors == []
    mods = {m.__name__: m for m in loaded}
    return mods["sdtoolkit_lora.py"], mods.get("lora_script.py")


def _unload():
    from modules import script_callbacks

    script_callbacks.script_unloaded_callback()


def generate(env, prompt, steps=1):
    from modules import processing, script_callbacks

    seen = {"to_q": []}
    unet = env.model.model.diffusion_model
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)

    def sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        for step in range(steps):   # the sampler's CFG denoiser calls cfg_denoiser_callback every step
            script_callbacks.cfg_denoiser_callback(script_callbacks.CFGDenoiserParams(
                x, None, torch.tensor([1.0]), step, steps, conditioning, unconditional_conditioning))
            seen["to_q"].append(unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.detach().clone())
            seen["eps"] = unet(x, torch.tensor([10]), context=conditioning)
        seen["cond"] = conditioning
        return torch.zeros(1, 4, 4, 4)

    p = processing.StableDiffusionProcessingTxt2Img(env.model, None, (), prompt=prompt, steps=steps)
    p.sample = sample
    res = processing.process_images(p)
    assert len(res.images) == 1
    seen["processed"] = res
    return p, seen


def assert_weights(env, want):
    """Every parameter equals ``want`` where given (tolerance: float64 reference) and the base bit-identically
    everywhere else."""
    now = checkpoint_state(env.model)
    for k, v in now.items():
        if k in want:
            torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6, msg=k)
            assert not torch.equal(v, env.base[k]), k
        else:
            assert torch.equal(v, env.base[k]), k


def test_lora_tag_without_builtin_applied_once_and_restored(env, caplog):
    from modules import extra_networks

    mod, _ = start(env, with_builtin=False)
    net = mod.network
    assert extra_networks.extra_network_registry == {"sdtlora": net}
    assert extra_networks.extra_network_aliases == {"lora": net, "lyco": net}
    assert net.mode == "in-place"
    calls = []
    orig_activate = net.activate
    net.activate = lambda p, params: (calls.append([list(x.items) for x in params]), orig_activate(p, params))

    p, _ = generate(env, "a cat <lora:style:0.8>, masterpiece")
    assert env.model.seen_prompts[-1] == ["a cat , masterpiece"]       # the tag is gone from what CLIP sees
    assert calls == [[["style", "0.8"]]]                                # one activate, one network
    want = expected(env.base, env.files["style"][1], STYLE, 0.8, 0.8)
    assert_weights(env, want)                                           # applied once: 2x would not match
    assert p.extra_generation_params["SD Toolkit Lora"] == "style: 0.8/0.8"

    # lora + lyco + sdtlora tags in one prompt: one activate call with every tag, each network applied once
    calls.clear()
    generate(env, "<lyco:sub dir/other:1:0.5> x <sdtlora:style:0.8>")
    assert calls == [[["sub dir/other", "1", "0.5"], ["style", "0.8"]]]
    want.update(expected(env.base, env.files["other"][1], OTHER, 1.0, 0.5))
    assert_weights(env, want)

    calls.clear()
    generate(env, "a cat, masterpiece")                                 # the next generation without the tag
    assert calls == [[]]                                                # activate([]) for the unmentioned network
    assert_weights(env, {})                                             # bit-identical to before
    net.activate = orig_activate


def expected_sum(base, parts):
    """Plain-torch W + Σ m · alpha/rank · up @ down over ``parts`` = [(file tensors, spec, te, unet)...], float64."""
    out = {}
    for sd, spec, te_mult, unet_mult in parts:
        for name, (key, rank, alpha) in spec.items():
            up = sd[f"{name}.lora_up.weight"].double().reshape(-1, rank)
            down = sd[f"{name}.lora_down.weight"].double().reshape(rank, -1)
            mult = te_mult if key.startswith("cond_stage_model.") else unet_mult
            w = out.get(key, base[key].double())
            out[key] = w + mult * (alpha / rank) * (up @ down).reshape(w.shape)
    return {k: v.float() for k, v in out.items()}


def reference(env, want, prompts):
    """(cond, eps) of an independent copy of the model (same seed, built apart) holding ``want`` (base elsewhere)."""
    with torch.no_grad():
        for name, t in env.ref.named_parameters():
            key = name.replace("wrapped.", "")
            t.copy_(want.get(key, env.base[key]))
        cond = env.ref.get_learned_conditioning(prompts)
        eps = env.ref.model.diffusion_model(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
                                            torch.tensor([10]), context=cond)
    return cond, eps


def test_before_ui_runs_in_reverse_order_like_the_webui(env):
    from modules import script_callbacks

    order = []
    script_callbacks.clear_callbacks()
    script_callbacks.on_before_ui(lambda: order.append("builtin (loaded first)"))
    script_callbacks.on_before_ui(lambda: order.append("user extension"))
    script_callbacks.before_ui_callback()
    assert order == ["user extension", "builtin (loaded first)"]
    script_callbacks.clear_callbacks()


def test_lora_and_sdtlora_mixed_over_generations_beside_the_builtin(env, caplog):
    """The built-in merges <lora> into the weights lazily from its own backup; <sdtlora> must add its deltas on
    top in every generation, whatever ran before (issue 10 defect 1: after a <lora>, <sdtlora> did nothing)."""
    from modules import extra_networks

    caplog.set_level(logging.INFO, logger="sdtoolkit.lora")
    mod, _ = start(env, with_builtin=True)
    net = mod.network
    assert extra_networks.extra_network_registry["lora"] is not net
    assert extra_networks.extra_network_registry["sdtlora"] is net
    assert extra_networks.extra_network_aliases["lyco"] is extra_networks.extra_network_registry["lora"]
    style, other = env.files["style"][1], env.files["other"][1]
    sequence = [   # prompt, what the built-in applies, what we apply
        ("a cat <sdtlora:style:0.8>", [], [(style, STYLE, 0.8, 0.8)]),
        ("a cat <lora:style:0.8>", [(style, STYLE, 0.8, 0.8)], []),
        ("a cat <sdtlora:style:0.8>", [], [(style, STYLE, 0.8, 0.8)]),
        ("a cat <lora:style:0.8> <sdtlora:sub dir/other:1:0.5>", [(style, STYLE, 0.8, 0.8)],
         [(other, OTHER, 1.0, 0.5)]),
        ("a cat <lora:style:0.5> <sdtlora:style:0.8>", [(style, STYLE, 0.5, 0.5)], [(style, STYLE, 0.8, 0.8)]),
        ("a cat <lyco:other:1:0.7> <sdtlora:style:1:0.3>", [(other, OTHER, 1.0, 0.7)], [(style, STYLE, 1.0, 0.3)]),
        ("a cat <sdtlora:style:0.8>", [], [(style, STYLE, 0.8, 0.8)]),
        ("a cat", [], []),
    ]
    for i, (prompt, theirs, ours) in enumerate(sequence):
        p, seen = generate(env, prompt)
        # the weights hold exactly the built-in's part (we write none); the base elsewhere, bit-identical
        assert_weights(env, expected_sum(env.base, theirs))
        # what the model computed = a model holding base + every delta of both extensions
        cond, eps = reference(env, expected_sum(env.base, theirs + ours), env.model.seen_prompts[-1])
        torch.testing.assert_close(seen["cond"], cond, rtol=1e-5, atol=1e-5, msg=f"step {i}: {prompt}")
        torch.testing.assert_close(seen["eps"], eps, rtol=1e-5, atol=1e-5, msg=f"step {i}: {prompt}")
        assert ("SD Toolkit Lora" in p.extra_generation_params) == bool(ours), prompt
        assert net.mode == "functional"
        if i == 0:
            # memory: the hooks keep the LoRA factors and nothing of a parameter's size
            kept = net.patcher.kept_tensors()
            factors = sum(style[f"{n}.lora_up.weight"].numel() + style[f"{n}.lora_down.weight"].numel()
                          for n in STYLE) * 4
            assert net.patcher.kept_bytes == factors and len(kept) == 2 * len(STYLE)
            live = {(id(m), a): getattr(m, a) for m in env.model.modules() for a in ("weight",)
                    if isinstance(getattr(m, a, None), torch.Tensor)}
            assert all(t.numel() < live[k].numel() for k, t in kept)
    assert seen["eps"].abs().max() > 0
    assert_weights(env, {})                                             # plain prompt: bit-identical base
    # the log says what happens (it said "the built-in Lora extension is not active" while it was)
    msgs = [r.getMessage() for r in caplog.records if r.name == "sdtoolkit.lora"]
    assert any("the built-in Lora extension handles <lora:...>" in m for m in msgs), msgs
    assert not any("no built-in Lora extension is active" in m or "is not active" in m for m in msgs), msgs


def test_bad_files_warn_and_generation_goes_on(env, caplog):
    start(env, with_builtin=False)
    caplog.set_level(logging.INFO)
    generate(env, "x <lora:broken:1>")
    assert_weights(env, {})
    generate(env, "x <lora:nan:1> <lora:missing:1> <lora:style:0.8> <lora:broken:1>")
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("broken.safetensors" in m and "goes on without it" in m for m in msgs), msgs
    assert any("nan.safetensors" in m and "lora_unet_down_blocks_0_resnets_0_conv1" in m and "NaN" in m
               for m in msgs), msgs
    assert any("<lora:missing:1>" in m and "no LoRA named 'missing'" in m for m in msgs), msgs   # the tag written
    assert_weights(env, expected(env.base, env.files["style"][1], STYLE, 0.8, 0.8))   # only the good one
    generate(env, "x")
    assert_weights(env, {})


def test_missing_lora_is_reported_with_its_tag_under_the_image(env, caplog):
    """Issue 10 defect 5: a <lora:name> that does not exist was ignored silently (and the console named it
    <sdtlora:...>). Now: the tag as written in the console, and the built-in's "Lora not found" comment, which the
    WebUI shows under the image (Processed.comments)."""
    caplog.set_level(logging.WARNING)
    start(env, with_builtin=False)
    p, seen = generate(env, "a cat <lora:nosuch:0.8> <lyco:gone:1> <sdtlora:absent:1> <lora:style:0.8>")
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(m.startswith("<lora:nosuch:0.8>: no LoRA named 'nosuch'") for m in msgs), msgs
    assert any(m.startswith("<lyco:gone:1>: no LoRA named 'gone'") for m in msgs), msgs
    assert any(m.startswith("<sdtlora:absent:1>: no LoRA named 'absent'") for m in msgs), msgs
    assert not any("<sdtlora:nosuch" in m or "<sdtlora:gone" in m for m in msgs), msgs
    assert seen["processed"].comments == "Lora not found: nosuch, gone\nSD Toolkit Lora not found: absent\n"
    assert_weights(env, expected(env.base, env.files["style"][1], STYLE, 0.8, 0.8))   # the rest still applies
    p, seen = generate(env, "a cat")
    assert seen["processed"].comments == ""                             # per generation
    # beside the built-in: its <lora> reports itself (same message), our <sdtlora> adds ours
    start(env, with_builtin=True)
    p, seen = generate(env, "a cat <lora:nosuch:1> <sdtlora:absent:1>")
    assert seen["processed"].comments == "Lora not found: nosuch\nSD Toolkit Lora not found: absent\n"
    generate(env, "x")
    assert_weights(env, {})


def test_a_lora_that_applies_partly_says_why_under_the_image(env):
    """Issue 14 item 5: the modules a LoRA leaves out, with the reason, shown where the WebUI shows extra-network
    errors (the comments under the image), not only in the console."""
    from safetensors.torch import load_file, save_file

    sd = load_file(env.files["style"][0])
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(1, 8)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 1)
    sd["lora_unet_no_such_layer.alpha"] = torch.tensor(1.0)
    save_file(sd, env.lora_dir / "partly.safetensors")
    start(env, with_builtin=False)
    p, seen = generate(env, "a cat <lora:partly:0.8>")
    comments = seen["processed"].comments
    assert "applies partly" in comments and "unknown target name" in comments, comments
    assert_weights(env, expected(env.base, env.files["style"][1], STYLE, 0.8, 0.8))   # the rest applies
    generate(env, "x")
    assert_weights(env, {})


def test_builtin_disabled_we_provide_its_cards_page_and_api(env):
    """Issue 10 defect 6: with the built-in Lora disabled, its "Lora" cards page and GET /sdapi/v1/loras +
    POST /sdapi/v1/refresh-loras disappeared. We provide them, with the built-in's item fields and JSON; beside the
    built-in we add neither (one page, one route)."""
    from fastapi.testclient import TestClient
    from modules import ui_extra_networks

    def lora_pages():
        return [pg for pg in ui_extra_networks.extra_pages if pg.title == "Lora"]

    def routes(app, path):
        return [r for r in app.routes if getattr(r, "path", None) == path]

    mod, builtin = start(env, with_builtin=True)
    assert len(lora_pages()) == 1 and mod.page is None
    theirs = lora_pages()[0]
    theirs.refresh()
    their_items = {i["name"]: i for i in theirs.list_items()}
    app = env.webui.start_app()
    assert len(routes(app, "/sdapi/v1/loras")) == 1 and len(routes(app, "/sdapi/v1/refresh-loras")) == 1
    their_json = sorted(TestClient(app).get("/sdapi/v1/loras").json(), key=lambda x: x["path"])

    mod, builtin = start(env, with_builtin=False)
    assert builtin is None and lora_pages() == [mod.page]
    ours = mod.page
    assert (ours.name, ours.extra_networks_tabname, ours.allow_prompt, ours.allow_negative_prompt) == \
        (theirs.name, theirs.extra_networks_tabname, theirs.allow_prompt, theirs.allow_negative_prompt)
    ours.refresh()
    our_items = {i["name"]: i for i in ours.list_items()}
    assert set(our_items) == set(their_items) >= {"style", "other"}
    assert our_items["style"]["prompt"] == '"<lora:style:" + opts.extra_networks_default_multiplier + ">"'
    for name, item in their_items.items():
        mine = our_items[name]
        assert set(mine) == set(item), name
        for k in ("filename", "prompt", "negative_prompt", "metadata", "local_preview", "description", "preview",
                  "sd_version"):
            assert mine[k] == item[k], (name, k)
        assert mine["search_terms"][0] == item["search_terms"][0]
    # a card's preferred weight and activation text, from the user-metadata sidecar the editor writes
    sidecar = env.lora_dir / "style.json"
    sidecar.write_text('{"preferred weight": 0.6, "activation text": "in style"}')
    try:
        assert ours.create_item("style", 0)["prompt"] == theirs.create_item("style", 0)["prompt"] == \
            '"<lora:style:" + 0.6 + ">" + " in style"'
    finally:
        sidecar.unlink()

    app = env.webui.start_app()
    assert len(routes(app, "/sdapi/v1/loras")) == 1 and len(routes(app, "/sdapi/v1/refresh-loras")) == 1
    client = TestClient(app)
    got = client.get("/sdapi/v1/loras")
    assert got.status_code == 200
    assert sorted(got.json(), key=lambda x: x["path"]) == their_json
    new = env.lora_dir / "fresh.safetensors"
    lora_file(new, OTHER, 7)
    try:
        r = client.post("/sdapi/v1/refresh-loras")
        assert r.status_code == 200 and r.json() is None
        assert "fresh" in {x["name"] for x in client.get("/sdapi/v1/loras").json()}
    finally:
        new.unlink()
        client.post("/sdapi/v1/refresh-loras")


def test_step_range_and_unload(env):
    start(env, with_builtin=False)
    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    want = expected(env.base, env.files["style"][1], STYLE, 1.0, 1.0)[key]
    _, seen = generate(env, "<lora:style:1:stop=2>", steps=4)
    on = [not torch.equal(w, env.base[key]) for w in seen["to_q"]]
    assert on == [True, True, False, False]
    torch.testing.assert_close(seen["to_q"][0], want, rtol=1e-6, atol=1e-6)
    generate(env, "<lora:style:1>")
    assert not torch.equal(checkpoint_state(env.model)[key], env.base[key])
    _unload()                                                           # script unload (UI reload) restores
    assert_weights(env, {})


def test_checkpoint_loaded_into_the_same_model_is_not_overwritten(env):
    from modules import script_callbacks

    start(env, with_builtin=False)
    generate(env, "<lora:style:0.8>")
    # the WebUI loads another checkpoint of the same config into the same object (load_state_dict)
    new_sd = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in env.model.state_dict().items()}
    new_base = {k: v * 1.5 if v.is_floating_point() else v for k, v in env.base.items()}
    new_base_live = {}
    for k, v in env.model.state_dict().items():
        new_base_live[k] = new_base[k.replace("wrapped.", "")]
    del new_sd
    env.model.load_state_dict(new_base_live)
    script_callbacks.model_loaded_callback(env.model)
    try:
        generate(env, "x")
        now = checkpoint_state(env.model)
        assert all(torch.equal(now[k], new_base[k]) for k in now)       # not "restored" to the old checkpoint
        generate(env, "<lora:style:0.8>")
        want = expected(new_base, env.files["style"][1], STYLE, 0.8, 0.8)
        now = checkpoint_state(env.model)
        for k in now:
            if k in want:
                torch.testing.assert_close(now[k], want[k], rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(now[k], new_base[k]), k
        generate(env, "x")
        now = checkpoint_state(env.model)
        assert all(torch.equal(now[k], new_base[k]) for k in now)
    finally:
        env.model.load_state_dict({k: env.base[k.replace("wrapped.", "")] for k in env.model.state_dict()})
    assert_weights(env, {})


def test_forge_a1111_network_registers_nothing(env, caplog):
    """On Forge the A1111 adapter stays out of the way: <sdtlora> goes through Forge's patcher instead
    (scripts/sdtoolkit_forge_lora.py; tests/test_forge_lora_bridge.py) and <lora> is Forge's own."""
    from modules import extra_networks

    caplog.set_level(logging.INFO)
    import importlib.machinery
    import importlib.util

    forge = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("modules_forge", None))
    sys.modules["modules_forge"] = forge                                # what `import modules_forge` finds on Forge
    try:
        mod, _ = start(env, with_builtin=False)
    finally:
        del sys.modules["modules_forge"]
    assert mod.IS_FORGE and mod.network is None
    assert extra_networks.extra_network_registry == {} and extra_networks.extra_network_aliases == {}
    generate(env, "a cat <lora:style:1>")                                # not ours on Forge: skipped here
    assert_weights(env, {})


def _autov3(path):
    """The addnet/AutoV3 hash by hand: sha256 of the bytes after the 8-byte length and the JSON header."""
    import hashlib

    raw = Path(path).read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def test_lora_hashes_infotext_like_the_builtin(env, monkeypatch, tmp_path):
    from modules import hashes, shared

    monkeypatch.setenv("SDTOOLKIT_CACHE_DIR", str(tmp_path / "sdt-cache"))
    comma = env.lora_dir / "my,style.safetensors"                      # a name the infotext must escape
    lora_file(comma, OTHER, 4)
    tagged = env.lora_dir / "tagged.safetensors"                       # sshs_model_hash metadata wins
    sd = {k: v for k, v in env.files["other"][1].items()}
    save_safetensors(tagged, sd, metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    try:
        start(env, with_builtin=False)
        assert shared.opts.lora_add_hashes_to_infotext is True           # the built-in's setting, same default
        p, _ = generate(env, "a cat <lora:style:0.8> <lora:my,style:0.5> <lora:tagged:0.1> <lora:missing:1>")
        want = (f"style: {_autov3(env.lora_dir / 'style.safetensors')[:12]}, "
                f"mystyle: {_autov3(comma)[:12]}, tagged: ABCDEF012345")
        assert p.extra_generation_params["Lora hashes"] == want
        # mirrored into the WebUI's own cache under its title: the WebUI would not hash the file again
        assert hashes.sha256_from_cache(str(comma), "lora/my,style", use_addnet_hash=True) == _autov3(comma)
        p, _ = generate(env, "x <lora:sub dir/other:1>")                 # the name as mentioned in the prompt
        assert p.extra_generation_params["Lora hashes"] == \
            f"sub dir/other: {_autov3(env.lora_dir / 'sub dir' / 'other.safetensors')[:12]}"
        p, _ = generate(env, "x")
        assert "Lora hashes" not in p.extra_generation_params
        shared.opts.set("lora_add_hashes_to_infotext", False)
        p, _ = generate(env, "x <lora:style:0.8>")
        assert "Lora hashes" not in p.extra_generation_params and "SD Toolkit Lora" in p.extra_generation_params
        shared.opts.set("lora_add_hashes_to_infotext", True)
        # with the built-in active, <lora:> is its own (it writes the field) and our <sdtlora:> adds none
        start(env, with_builtin=True)
        p, _ = generate(env, "x <lora:style:0.8> <sdtlora:style:0.5>")
        assert p.extra_generation_params["Lora hashes"] == f"style: {_autov3(env.lora_dir / 'style.safetensors')[:12]}"
        generate(env, "x")                      # the built-in restores its merge at the next plain generation
    finally:
        comma.unlink()
        tagged.unlink()
        start(env, with_builtin=False)
        generate(env, "x")
    assert_weights(env, {})


# ------------------------------------------------------------------ SDXL in the WebUI's layout (sgm + sd_hijack)
class OpenCLIPResidualBlock(nn.Module):     # open_clip.transformer.ResidualAttentionBlock (ls_* are Identity)
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d, mlp))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp, d))


class OpenCLIPText(nn.Module):               # the text tower sgm's FrozenOpenCLIPEmbedder2 keeps as .model
    def __init__(self, vocab, d, heads, mlp, layers, ctx=77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, d))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenCLIPResidualBlock(d, heads, mlp) for _ in range(layers))
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(torch.empty(d, d))
        self.logit_scale = nn.Parameter(torch.empty(()))


class Embedder(nn.Module):   # sgm's FrozenCLIPEmbedder (.transformer) / FrozenOpenCLIPEmbedder2 (.model)
    def __init__(self, **parts):
        super().__init__()
        for k, v in parts.items():
            setattr(self, k, v)


class WithCustomWords(nn.Module):            # modules/sd_hijack_clip.py: the embedder kept as .wrapped
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


class Conditioner(nn.Module):                # sgm.modules.GeneralConditioner
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class DiffusionEngine(nn.Module):            # sgm DiffusionEngine as the WebUI loads it (is_sdxl)
    is_sdxl = True
    is_sd2 = False
    is_sd1 = False

    def __init__(self, unet, conditioner, vae):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.conditioner = conditioner
        self.first_stage_model = vae
        self.scale_factor = 0.13025

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


XL_UNET = "model.diffusion_model."
XL_TE2 = "conditioner.embedders.1.wrapped.model.transformer.resblocks."
#: kohya SDXL name -> (live parameter, rows of it or None, rank, alpha); the sgm -> diffusers module names written
#: out by hand (input_blocks 4/5 = down_blocks.1, 7/8 = down_blocks.2, output_blocks 3-5 = up_blocks.1;
#: resnet in_layers.2 = conv1) and te2's q/k/v as rows of OpenCLIP's fused in_proj_weight (d = 64)
XL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        (XL_UNET + "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", None, 4, 2.0),
    "lora_unet_input_blocks_7_0_in_layers_2": (XL_UNET + "down_blocks.2.resnets.0.conv1.weight", None, 4, 4.0),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k":
        (XL_UNET + "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", None, 2, 1.0),
    "lora_unet_output_blocks_3_1_proj_out": (XL_UNET + "up_blocks.1.attentions.0.proj_out.weight", None, 4, 4.0),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("conditioner.embedders.0.wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
         None, 4, 4.0),
    "lora_te2_text_model_encoder_layers_1_self_attn_k_proj":
        (XL_TE2 + "1.attn.in_proj_weight", slice(64, 128), 4, 2.0),
    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj":
        (XL_TE2 + "1.attn.in_proj_weight", slice(128, 192), 2, 2.0),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": (XL_TE2 + "0.attn.out_proj.weight", None, 4, 4.0),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (XL_TE2 + "0.mlp.c_fc.weight", None, 4, 4.0),
}


def test_sdxl_lora_in_the_webui_layout_exact_and_restored(env):
    from modules import processing, shared
    from lib_sdtoolkit.samples import factory

    mods = factory.build_modules("SDXL", "tiny", seed=0)
    sd = factory.build_state_dict("SDXL", "tiny", 0)
    g_cfg = mods["text_encoder_2"].config
    g = OpenCLIPText(g_cfg.vocab_size, g_cfg.hidden_size, g_cfg.num_attention_heads, g_cfg.intermediate_size,
                     g_cfg.num_hidden_layers)
    pre = "conditioner.embedders.1.model."
    g.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}, strict=True)
    te1 = mods["text_encoder"]
    te1.text_model.embeddings.token_embedding = EmbeddingsWithFixes(te1.text_model.embeddings.token_embedding)
    model = DiffusionEngine(mods["unet"], Conditioner([WithCustomWords(Embedder(transformer=te1)),
                                                       WithCustomWords(Embedder(model=g))]), mods["vae"]).eval()
    live = dict(model.named_parameters())
    base = {k: v.detach().clone() for k, v in live.items()}

    gen = torch.Generator().manual_seed(11)
    lsd = {}
    for name, (param, rows, rank, alpha) in XL.items():
        w = live[param][rows] if rows is not None else live[param]
        down = (rank, *w.shape[1:]) if w.dim() == 4 else (rank, w.shape[1])
        up = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
        lsd[f"{name}.lora_down.weight"] = torch.randn(down, generator=gen) * 0.3
        lsd[f"{name}.lora_up.weight"] = torch.randn(up, generator=gen) * 0.3
        lsd[f"{name}.alpha"] = torch.tensor(alpha)
    path = save_safetensors(env.lora_dir / "xl.safetensors", lsd,
                            metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    want = {k: v.double() for k, v in base.items()}                   # W + m * alpha/rank * up @ down, float64
    for name, (param, rows, rank, alpha) in XL.items():
        m = 0.7 if name.startswith("lora_te") else 0.9
        up = lsd[f"{name}.lora_up.weight"].double().reshape(-1, rank)
        down = lsd[f"{name}.lora_down.weight"].double().reshape(rank, -1)
        tgt = want[param][rows] if rows is not None else want[param]
        tgt += m * alpha / rank * (up @ down).reshape(tgt.shape)
    changed = {XL[n][0] for n in XL}

    old = shared.sd_model
    shared.sd_model = model
    try:
        start(env, with_builtin=False)
        seen = {}

        def sample(*a, **k):
            seen.update({n: t.detach().clone() for n, t in model.named_parameters()})
            return torch.zeros(1, 4, 4, 4)

        p = processing.StableDiffusionProcessingTxt2Img(model, None, (), prompt="a cat <lora:xl:0.7:0.9>", steps=1)
        p.sample = sample
        processing.process_images(p)
        assert p.extra_generation_params["SD Toolkit Lora"] == "xl: 0.7/0.9"
        for k, v in seen.items():                                     # what the sampler saw
            if k in changed:
                torch.testing.assert_close(v, want[k].float(), rtol=1e-6, atol=1e-6, msg=k)
                assert not torch.equal(v, base[k]), k
            else:
                assert torch.equal(v, base[k]), k
        p = processing.StableDiffusionProcessingTxt2Img(model, None, (), prompt="a cat", steps=1)
        p.sample = sample
        processing.process_images(p)
        assert all(torch.equal(t, base[k]) for k, t in model.named_parameters())   # bit-identical again
    finally:
        path.unlink()
        _unload()
        shared.sd_model = old
    assert all(torch.equal(t, base[k]) for k, t in model.named_parameters())


# ------------------------------------------------------------------ the SDXL refiner (the WebUI calls it is_sdxl too)
REF_TE2 = "conditioner.embedders.0.wrapped.model.transformer.resblocks."
#: kohya refiner name -> (live parameter, block); the sgm -> diffusers names written out by hand (refiner levels 0-3 =
#: input_blocks 1-2 / 4-5 / 7-8 / 10-11, up_blocks.N = output_blocks 3N..3N+2; in_layers.2 = conv1)
REF = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        (XL_UNET + "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "IN04"),
    "lora_unet_input_blocks_10_0_in_layers_2": (XL_UNET + "down_blocks.3.resnets.0.conv1.weight", "IN10"),
    "lora_unet_middle_block_1_proj_in": (XL_UNET + "mid_block.attentions.0.proj_in.weight", "M00"),
    "lora_unet_output_blocks_9_0_in_layers_2": (XL_UNET + "up_blocks.3.resnets.0.conv1.weight", "OUT09"),
    "lora_unet_output_blocks_11_0_skip_connection": (XL_UNET + "up_blocks.3.resnets.2.conv_shortcut.weight", "OUT11"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (REF_TE2 + "0.mlp.c_fc.weight", "BASE"),
}
#: lbw= with one weight per refiner block: BASE, IN00..IN11, M00, OUT00..OUT11
REF_LBW = [round(0.3 + 0.025 * i, 3) for i in range(26)]
REF_IDS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def test_refiner_is_bound_as_a_refiner_and_lbw_weighs_every_block(env):
    """A refiner-shaped sd_model (sgm layout, OpenCLIP-G at conditioner.embedders.0, is_sdxl like the WebUI sets it):
    the adapter asks the library's detector, binds the refiner's name table, and ``lbw=`` with the refiner's 26 values
    weighs IN10 / OUT09 / OUT11 as given (with SDXL's tables they matched nothing and the 26 values were refused)."""
    from modules import processing, shared
    from lib_sdtoolkit.samples import factory

    mods = factory.build_modules("SDXL-refiner", "tiny", seed=0)
    sd = factory.build_state_dict("SDXL-refiner", "tiny", 0)
    g_cfg = mods["text_encoder_2"].config
    g = OpenCLIPText(g_cfg.vocab_size, g_cfg.hidden_size, g_cfg.num_attention_heads, g_cfg.intermediate_size,
                     g_cfg.num_hidden_layers)
    pre = "conditioner.embedders.0.model."
    g.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}, strict=True)
    model = DiffusionEngine(mods["unet"], Conditioner([WithCustomWords(Embedder(model=g))]), mods["vae"]).eval()
    assert model.is_sdxl
    live = dict(model.named_parameters())
    base = {k: v.detach().clone() for k, v in live.items()}

    gen = torch.Generator().manual_seed(13)
    lsd = {}
    for name, (param, _) in REF.items():
        w = live[param]
        down = (4, *w.shape[1:]) if w.dim() == 4 else (4, w.shape[1])
        up = (w.shape[0], 4, 1, 1) if w.dim() == 4 else (w.shape[0], 4)
        lsd[f"{name}.lora_down.weight"] = torch.randn(down, generator=gen) * 0.3
        lsd[f"{name}.lora_up.weight"] = torch.randn(up, generator=gen) * 0.3
        lsd[f"{name}.alpha"] = torch.tensor(2.0)
    path = save_safetensors(env.lora_dir / "refiner.safetensors", lsd)
    weights = dict(zip(REF_IDS, REF_LBW))
    want = {}                                                          # W + m * w_block * alpha/rank * up @ down
    for name, (param, block) in REF.items():
        m = (0.7 if name.startswith("lora_te") else 0.9) * weights[block]
        up = lsd[f"{name}.lora_up.weight"].double().reshape(-1, 4)
        down = lsd[f"{name}.lora_down.weight"].double().reshape(4, -1)
        want[param] = (base[param].double() + m * 2.0 / 4 * (up @ down).reshape(base[param].shape)).float()

    old = shared.sd_model
    shared.sd_model = model
    try:
        start(env, with_builtin=False)
        seen = {}

        def sample(*a, **k):
            seen.update({n: t.detach().clone() for n, t in model.named_parameters()})
            return torch.zeros(1, 4, 4, 4)

        lbw = ",".join(map(str, REF_LBW))
        p = processing.StableDiffusionProcessingTxt2Img(model, None, (), prompt=f"a cat <lora:refiner:0.7:0.9:lbw={lbw}>",
                                                        steps=1)
        p.sample = sample
        processing.process_images(p)
        assert p.extra_generation_params["SD Toolkit Lora"] == "refiner: 0.7/0.9"
        for k, v in seen.items():                                     # what the sampler saw
            if k in want:
                torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6, msg=k)
                assert not torch.equal(v, base[k]), k
            else:
                assert torch.equal(v, base[k]), k
    finally:
        path.unlink()
        _unload()
        shared.sd_model = old
    assert all(torch.equal(t, base[k]) for k, t in model.named_parameters())


def test_flux_lora_on_an_sd_model_says_it_does_not_match(env, caplog):
    """A1111 has no Flux: ``<sdtlora>`` naming a Flux.1 LoRA (kohya names, no metadata) on the SD1 model is refused
    with the reason - the file and "this is a Flux.1 network and the model is SD1" - in the console and under the
    image, nothing is applied and the infotext names no network."""
    g = torch.Generator().manual_seed(9)
    sd = {}
    for name, o, i in (("lora_unet_double_blocks_0_img_attn_qkv", 96, 32), ("lora_unet_single_blocks_1_linear1", 224, 32),
                       ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)):
        sd[f"{name}.lora_down.weight"] = torch.randn(4, i, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 4, generator=g)
    path = env.lora_dir / "fluxk.safetensors"
    save_safetensors(path, sd)
    try:
        caplog.set_level(logging.WARNING)
        start(env, with_builtin=False)
        p, seen = generate(env, "a cat <sdtlora:fluxk:1>")
        msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        why = "this is a Flux.1 network and the model is SD1; not applied"
        assert any(m.startswith("<sdtlora:fluxk:1>:") and "fluxk.safetensors" in m and why in m for m in msgs), msgs
        assert why in seen["processed"].comments and "fluxk.safetensors" in seen["processed"].comments
        assert "SD Toolkit Lora" not in p.extra_generation_params
        assert_weights(env, {})
    finally:
        path.unlink()
