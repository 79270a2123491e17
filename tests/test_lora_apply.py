"""Applying networks to the real tiny modules: same UNet output as diffusers' own loader, exact restore, switching
cost, caching, block weights, functional mode, bad input."""

import pytest
import torch

from lib_sdtoolkit.errors import ArchitectureError, ModelFileError
from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.lora.apply import ActiveNetwork, FunctionalLora, LoraPatcher, ModelBinding
from lib_sdtoolkit.lora.blocks import resolve_block_weights
from lib_sdtoolkit.lora.network import load_network
from lib_sdtoolkit.lora.synth import make_lora_state_dict

pytest.importorskip("peft")  # diffusers' LoRA loader needs the PEFT backend


#: tiny models: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def sd1(tiny_modules):
    return tiny_modules("SD1")


@pytest.fixture(scope="session")
def binding(sd1):
    return ModelBinding.from_parts("SD1", unet=sd1["unet"], text_encoder=sd1["text_encoder"])


@pytest.fixture(scope="session")
def files(tmp_path_factory, binding):
    d = tmp_path_factory.mktemp("loras")
    out = {}
    unet_only = lambda n: n.startswith("lora_unet_")  # noqa: E731
    attn = lambda n: ("attn1" in n or "attn2" in n or "self_attn" in n)  # noqa: E731
    specs = {
        "unet": dict(seed=1, name_filter=unet_only),
        "all": dict(seed=2),
        "attn": dict(seed=3, name_filter=attn),
        "attn_b": dict(seed=4, name_filter=lambda n: "attn2" in n and "up_blocks_3" in n),
    }
    for name, kw in specs.items():
        sd = make_lora_state_dict(binding.target_shape, "SD1", rank=4, **kw)
        out[name] = save_safetensors(d / f"{name}.safetensors", sd)
        out[name + "_sd"] = sd
    return out


def unet_out(unet, diffusers=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([10])
    with torch.no_grad():
        if diffusers:
            return unet(x, t, encoder_hidden_states=ctx).sample
        return unet(x, t, context=ctx)


def snapshot(*mods):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in mods]


def same_bits(a, b):
    return all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_kohya_lora_on_ldm_equals_diffusers_loader(sd1, binding, files, tiny_modules):
    from diffusers import StableDiffusionPipeline

    dunet = tiny_modules("SD1", diffusers=True)["unet"]
    assert torch.allclose(unet_out(sd1["unet"]), unet_out(dunet, True), atol=1e-5)
    base = unet_out(sd1["unet"])
    state, alphas = StableDiffusionPipeline.lora_state_dict({k: v.clone() for k, v in files["unet_sd"].items()})
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, dunet, adapter_name="t1")
    try:
        ref = unet_out(dunet, True)
        p = LoraPatcher(binding)
        res = p.set_networks([ActiveNetwork(load_network(files["unet"], "SD1"))])
        try:
            assert res.errors == [] and res.touched > 200
            ours = unet_out(sd1["unet"])
        finally:
            p.restore_all()
        assert (ref - base).abs().max() > 1e-2  # the LoRA does something
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)
    finally:
        dunet.delete_adapters("t1")


def test_peft_file_without_alpha_is_scale_one(sd1, binding, files, tiny_modules, tmp_path):
    """A diffusers/PEFT file (dotted ``unet.`` keys, lora_A/lora_B, no alpha) loads with scale 1, as diffusers does."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    dunet = tiny_modules("SD1", diffusers=True)["unet"]
    state, alphas = StableDiffusionPipeline.lora_state_dict({k: v.clone() for k, v in files["unet_sd"].items()})
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, dunet, adapter_name="src")
    peft_sd = {"unet." + k: v.clone() for k, v in get_peft_model_state_dict(dunet, adapter_name="src").items()}
    dunet.delete_adapters("src")
    assert any(".lora_A.weight" in k for k in peft_sd) and not any("alpha" in k for k in peft_sd)
    path = save_safetensors(tmp_path / "peft.safetensors", peft_sd)
    state2, alphas2 = StableDiffusionPipeline.lora_state_dict(dict(peft_sd))
    StableDiffusionPipeline.load_lora_into_unet(state2, alphas2, dunet, adapter_name="p")
    try:
        ref = unet_out(dunet, True)
    finally:
        dunet.delete_adapters("p")
    net = load_network(path, "SD1")
    assert not net.unmatched
    p = LoraPatcher(binding)
    try:
        assert p.set_networks([ActiveNetwork(net)]).errors == []
        ours = unet_out(sd1["unet"])
    finally:
        p.restore_all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)


def test_exact_restore_and_switching(sd1, binding, files):
    before = snapshot(sd1["unet"], sd1["text_encoder"])
    p = LoraPatcher(binding)
    a, b = load_network(files["attn"], "SD1"), load_network(files["attn_b"], "SD1")
    try:
        r1 = p.set_networks([ActiveNetwork(a)])
        assert r1.touched == len(a.layers)
        params = dict(sd1["unet"].named_parameters())
        # a write is either in place (version counter) or a patched copy swapped in (storage)
        state = lambda v: (v._version, v.data_ptr())  # noqa: E731
        versions = {k: state(v) for k, v in params.items()}
        # adding B touches exactly B's layers (those params now hold A+B), nothing else
        r2 = p.set_networks([ActiveNetwork(a), ActiveNetwork(b)])
        assert r2.touched == len(b.layers)
        changed = {k for k, v in params.items() if state(v) != versions[k]}
        targets_b = {layer.weight_key[len("model.diffusion_model."):] for layer in b.layers}
        assert changed == targets_b
        # the same set again costs nothing: answered from the last key, no parameter written, swapped or restored
        versions = {k: state(v) for k, v in params.items()}
        te_params = dict(sd1["text_encoder"].named_parameters())
        te_versions = {k: state(v) for k, v in te_params.items()}
        r3 = p.set_networks([ActiveNetwork(a), ActiveNetwork(b)])
        assert r3.cached and r3.touched == 0 and r3.errors == []
        assert all(state(v) == versions[k] for k, v in params.items())
        assert all(state(v) == te_versions[k] for k, v in te_params.items())
        # a different multiplier is a different key: only the UNet layers (the te weight is not used there)
        r4 = p.set_networks([ActiveNetwork(a, te=0.5, unet=1.0), ActiveNetwork(b)])
        assert r4.touched == sum(1 for layer in a.layers if layer.component == "text_encoder")
    finally:
        p.restore_all()
    assert all(same_bits(x, y) for x, y in zip(before, snapshot(sd1["unet"], sd1["text_encoder"])))


def test_memory_bounded_over_100_switches(sd1, binding, files):
    before = snapshot(sd1["unet"])
    p = LoraPatcher(binding)
    nets = [load_network(files[n], "SD1") for n in ("attn", "attn_b", "unet")]
    sizes = {}
    try:
        for i in range(100):
            net = nets[i % 3]
            p.set_networks([ActiveNetwork(net, unet=1.0 + (i % 5) * 0.1)])
            touched = {(layer.weight_key, layer.target.qkv_index) for layer in net.layers}
            # one backup per touched parameter, nothing left over from earlier sets
            assert len(p._backup) == len({k[0] for k in touched})
            sizes.setdefault(i % 3, set()).add(p.backup_bytes)
    finally:
        p.restore_all()
    assert all(len(s) == 1 for s in sizes.values())
    assert p.backup_bytes == 0
    assert same_bits(before[0], snapshot(sd1["unet"])[0])


def test_fp16_delta_accumulated_in_fp32_cast_once(tmp_path):
    lin = torch.nn.Linear(16, 8).half()
    holder = torch.nn.Module()
    holder.lin = lin
    g = torch.Generator().manual_seed(5)
    ups = [torch.randn(8, 2, generator=g) * 1e-3 for _ in range(3)]
    downs = [torch.randn(2, 16, generator=g) * 1e-3 for _ in range(3)]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    nets = []
    for i in range(3):
        path = save_safetensors(tmp_path / f"n{i}.safetensors", {f"{name}.lora_up.weight": ups[i].half(),
                                                                 f"{name}.lora_down.weight": downs[i].half()})
        nets.append(load_network(path, "SD1"))
    bind = ModelBinding("SD1")
    bind._params["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] = (lin, "weight")
    orig = lin.weight.detach().clone()
    p = LoraPatcher(bind)
    p.set_networks([ActiveNetwork(n) for n in nets])
    ref = (orig.float() + sum(u.half().float() @ d.half().float() for u, d in zip(ups, downs))).half()
    assert torch.equal(lin.weight.detach(), ref)
    p.restore_all()
    assert torch.equal(lin.weight.detach(), orig)


def test_patching_ignores_autocast_and_inference_mode(tmp_path):
    """The WebUI activates networks inside devices.autocast() (and may be in inference mode): ΔW stays fp32 and the
    weights are the same bits as outside; restore is still exact and the parameter stays a normal tensor."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(6)
    path = save_safetensors(tmp_path / "n.safetensors", {f"{name}.lora_up.weight": torch.randn(8, 4, generator=g),
                                                         f"{name}.lora_down.weight": torch.randn(4, 16, generator=g)})
    net = load_network(path, "SD1")
    out = []
    for ctx in (False, True):
        lin = torch.nn.Linear(16, 8)
        torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(1))
        orig = lin.weight.detach().clone()
        bind = ModelBinding("SD1")
        bind._params["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] = (lin, "weight")
        p = LoraPatcher(bind)
        if ctx:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                p.set_networks([ActiveNetwork(net)])
        else:
            p.set_networks([ActiveNetwork(net)])
        assert lin.weight.dtype == torch.float32 and not lin.weight.is_inference()
        out.append(lin.weight.detach().clone())
        with torch.inference_mode():
            p.restore_all()
        assert torch.equal(lin.weight.detach(), orig)
    assert torch.equal(out[0], out[1])


def test_block_weights_and_dyn_in_cache_key(sd1, binding, files):
    before = snapshot(sd1["unet"])[0]
    net = load_network(files["unet"], "SD1")
    p = LoraPatcher(binding)
    try:
        p.set_networks([ActiveNetwork(net)])
        full = snapshot(sd1["unet"])[0]
        bw = resolve_block_weights("OUTALL", "SD1")
        r = p.set_networks([ActiveNetwork(net, block_weights=bw)])
        assert not r.cached and r.touched > 0
        now = snapshot(sd1["unet"])[0]
        k_in = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        k_out = "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
        assert torch.equal(now[k_in], before[k_in])       # IN01 weight 0: restored exactly
        assert torch.equal(now[k_out], full[k_out])       # OUT03 weight 1
        half = {k: (0.5 if v else 0.0) for k, v in bw.items()}
        p.set_networks([ActiveNetwork(net, block_weights=half)])
        mid = snapshot(sd1["unet"])[0]
        torch.testing.assert_close(mid[k_out] - before[k_out], 0.5 * (full[k_out] - before[k_out]),
                                   rtol=1e-4, atol=1e-7)
        r = p.set_networks([ActiveNetwork(net, block_weights=half, dyn=2)])
        assert not r.cached and r.touched > 0
    finally:
        p.restore_all()


def test_step_range(sd1, binding, files):
    net = load_network(files["attn_b"], "SD1")
    p = LoraPatcher(binding)
    before = snapshot(sd1["unet"])[0]
    try:
        p.set_networks([ActiveNetwork(net, start=3, stop=5)])
        p.set_step(0)
        assert same_bits(before, snapshot(sd1["unet"])[0])
        assert p.set_step(3).touched == len(net.layers)
        assert p.set_step(4).touched == 0
        assert p.set_step(5).touched == len(net.layers)
        assert same_bits(before, snapshot(sd1["unet"])[0])
    finally:
        p.restore_all()


def test_functional_mode_matches_in_place_without_writing(sd1, binding, files):
    net = load_network(files["all"], "SD1")
    p = LoraPatcher(binding)
    try:
        p.set_networks([ActiveNetwork(net, te=0.7, unet=0.9)])
        ref = unet_out(sd1["unet"])
    finally:
        p.restore_all()
    before = snapshot(sd1["unet"])[0]
    f = FunctionalLora(binding)
    try:
        f.set_networks([ActiveNetwork(net, te=0.7, unet=0.9)])
        ours = unet_out(sd1["unet"])
    finally:
        f.remove()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert same_bits(before, snapshot(sd1["unet"])[0])
    torch.testing.assert_close(unet_out(sd1["unet"]), unet_out(sd1["unet"]))


def _openclip_like(width=16, heads=2):
    root = torch.nn.Module()
    root.cond_stage_model = torch.nn.Module()
    root.cond_stage_model.model = torch.nn.Module()
    root.cond_stage_model.model.transformer = torch.nn.Module()
    blocks = torch.nn.ModuleList()
    for _ in range(2):
        blk = torch.nn.Module()
        blk.attn = torch.nn.MultiheadAttention(width, heads)
        blocks.append(blk)
    root.cond_stage_model.model.transformer.resblocks = blocks
    return root


def test_sd2_fused_attention_in_place_and_functional(tmp_path):
    torch.manual_seed(0)
    root = _openclip_like()
    attn = root.cond_stage_model.model.transformer.resblocks[0].attn
    g = torch.Generator().manual_seed(9)
    sd, parts = {}, {}
    for proj in ("q", "k", "v", "out"):
        n = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}_proj"
        up, down = torch.randn(16, 2, generator=g) * 0.1, torch.randn(2, 16, generator=g) * 0.1
        sd.update({f"{n}.lora_up.weight": up, f"{n}.lora_down.weight": down, f"{n}.alpha": torch.tensor(1.0)})
        parts[proj] = (up @ down) * 0.5
    net = load_network(save_safetensors(tmp_path / "sd2.safetensors", sd), "SD2")
    bind = ModelBinding.from_checkpoint_module(root, "SD2")
    x = torch.randn(5, 1, 16)
    orig_in, orig_out = attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone()
    with torch.no_grad():
        ref_attn = torch.nn.MultiheadAttention(16, 2)
        ref_attn.load_state_dict(attn.state_dict())
        ref_attn.in_proj_weight += torch.cat([parts["q"], parts["k"], parts["v"]])
        ref_attn.out_proj.weight += parts["out"]
        ref = ref_attn(x, x, x, need_weights=False)[0]
    p = LoraPatcher(bind)
    assert p.set_networks([ActiveNetwork(net)]).errors == []
    torch.testing.assert_close(attn.in_proj_weight.detach(), ref_attn.in_proj_weight.detach())
    p.restore_all()
    assert torch.equal(attn.in_proj_weight, orig_in) and torch.equal(attn.out_proj.weight, orig_out)
    f = FunctionalLora(bind)
    f.set_networks([ActiveNetwork(net)])
    with torch.no_grad():
        got = attn(x, x, x, need_weights=False)[0]
    f.remove()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(attn.in_proj_weight, orig_in)


def test_bad_inputs_name_file_and_layer(sd1, binding, files, tmp_path):
    from lib_sdtoolkit.samples import factory  # noqa: F401

    # an SDXL LoRA (sgm names, te1/te2) on an SD1 model
    xl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k.lora_up.weight": torch.zeros(8, 2),
          "lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k.lora_down.weight": torch.zeros(2, 8)}
    p_xl = save_safetensors(tmp_path / "xl.safetensors", xl)
    with pytest.raises(ArchitectureError, match="SDXL") as e:
        load_network(p_xl, "SD1")
    assert "xl.safetensors" in str(e.value)
    # truncated
    raw = files["attn"].read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match="trunc"):
        load_network(trunc, "SD1")
    # NaN in a factor
    bad = dict(files["attn_b_sd"])
    k = next(k for k in bad if k.endswith("lora_up.weight"))
    bad[k] = bad[k].clone()
    bad[k][0, 0] = float("nan")
    nan = save_safetensors(tmp_path / "nan.safetensors", bad)
    with pytest.raises(ModelFileError, match="NaN") as e:
        load_network(nan, "SD1")
    assert k.split(".")[0] in str(e.value) and "nan.safetensors" in str(e.value)
    # rank mismatch: the generation goes on with the good network, without the bad one
    mism = dict(files["attn_b_sd"])
    k = next(k for k in mism if k.endswith("lora_down.weight"))
    mism[k] = torch.zeros(3, mism[k].shape[1])
    mm = load_network(save_safetensors(tmp_path / "mism.safetensors", mism), "SD1")
    good = load_network(files["attn"], "SD1")
    before = snapshot(sd1["unet"])[0]
    p = LoraPatcher(binding)
    try:
        res = p.set_networks([ActiveNetwork(mm), ActiveNetwork(good)])
        assert len(res.errors) == 1 and "mism.safetensors" in res.errors[0] and k.split(".")[0] in res.errors[0]
        assert res.applied == [good.name]
        with_bad = snapshot(sd1["unet"])[0]
        p.restore_all()
        assert same_bits(before, snapshot(sd1["unet"])[0])
        p.set_networks([ActiveNetwork(good)])
        assert same_bits(with_bad, snapshot(sd1["unet"])[0])  # nothing of the bad network was applied
    finally:
        p.restore_all()


def test_unmatched_keys_are_counted(tmp_path, files):
    sd = dict(files["attn_b_sd"])
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    net = load_network(save_safetensors(tmp_path / "extra.safetensors", sd), "SD1")
    assert net.unmatched == ["lora_unet_no_such_layer"]
    assert "1 modules match nothing" in net.report()
