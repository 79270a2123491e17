"""LoRA surgery (#14): faithful extraction, resize, merge, explain (inspect --model), OFT/BOFT.

Every expected value is computed here from the files' factors with plain torch (``torch.linalg.svd`` of the
delta, the OFT/BOFT formulas written out with explicit loops and permutation matrices), never from our own output.
"""
import json
import math

import pytest
import torch

from lib_sdtoolkit import cli
from lib_sdtoolkit.files import load_state_dict, open_model, save_safetensors
from lib_sdtoolkit.lora.synth import attention_and_conv, make_lora_state_dict

ATTN_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"


#: tiny models: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(fixture_files):
    with open_model(fixture_files["sd1"]) as r:
        return {k: tuple(i.shape) for k, i in r.infos().items()}


def _run(args, capsys):
    capsys.readouterr()
    rc = cli.main([*map(str, args), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _lora_deltas(path):
    """{module: scale · up @ down (fp64, flattened to 2-D)} of a kohya LoRA file, from its tensors."""
    sd = load_state_dict(path)
    out = {}
    for k in sd:
        if k.endswith(".lora_up.weight"):
            m = k[:-len(".lora_up.weight")]
            up, down = sd[k].double(), sd[m + ".lora_down.weight"].double()
            r = down.shape[0]
            alpha = float(sd[m + ".alpha"]) if m + ".alpha" in sd else r
            out[m] = (alpha / r) * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))
    return out


def _svd_truncate(d, k):
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


# ------------------------------------------------------------------------------------------------ 1. extract
@pytest.fixture(scope="module")
def tuned(fixture_files, tmp_path_factory):
    """The SD1 fixture plus an exactly rank-3 difference on attention, text-encoder MLP and one 3x3 conv."""
    base = fixture_files["sd1"]
    sd = load_state_dict(base)
    g = torch.Generator().manual_seed(17)
    diffs = {}
    for k in (ATTN_K, "model.diffusion_model.output_blocks.5.1.proj_out.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight", CONV):
        w = sd[k]
        flat = w.reshape(w.shape[0], -1)
        d = (torch.randn(flat.shape[0], 3, generator=g) @ torch.randn(3, flat.shape[1], generator=g)) * 0.01
        diffs[k] = d.reshape(w.shape)
        sd[k] = w + diffs[k]
    d = tmp_path_factory.mktemp("surgery_extract")
    return base, save_safetensors(d / "tuned.safetensors", sd), diffs


EXTRACTED = {  # checkpoint key -> kohya name
    ATTN_K: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "model.diffusion_model.output_blocks.5.1.proj_out.weight": "lora_unet_up_blocks_1_attentions_2_proj_out",
    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight":
        "lora_te_text_model_encoder_layers_3_mlp_fc1",
    CONV: "lora_unet_down_blocks_1_resnets_0_conv1",
}


@pytest.mark.parametrize("dtype,svd,tol", [("fp16", "auto", 2e-3), ("fp32", "full", 2e-6),
                                           ("fp32", "randomized", 2e-6)])
def test_rank3_difference_extracted_at_rank8_comes_back_by_default(tuned, tmp_path, capsys, dtype, svd, tol):
    """The defaults do not clamp: a difference whose rank the extraction covers comes back to the output dtype's
    precision (kohya's 0.99 clamp, the old default, gave ~4 % relative error here)."""
    base, tuned_path, diffs = tuned
    out = tmp_path / "ex.safetensors"
    rep = _run(["lora", "extract", tuned_path, base, "-o", out, "--rank", 8, "--conv-rank", 8, "--dtype", dtype,
                "--svd", svd, "-q"], capsys)
    assert rep["clamp_quantile"] is None and rep["layers"] == 4
    methods = {x["svd"] for x in rep["layer_report"]}
    assert methods == {"randomized"} if svd == "randomized" else methods == {"full"} if svd == "full" else methods
    got = _lora_deltas(out)
    for key, name in EXTRACTED.items():
        d = diffs[key].double().reshape(diffs[key].shape[0], -1)
        rel = float((got[name] - d).norm() / d.norm())
        assert rel < tol, (name, rel)
    assert all(x["energy"] > 1 - 1e-5 for x in rep["layer_report"])
    if dtype == "fp32" and svd == "full":
        # the clamp is still there when asked for, and it is what loses the precision
        out2 = tmp_path / "clamped.safetensors"
        _run(["lora", "extract", tuned_path, base, "-o", out2, "--rank", 8, "--dtype", "fp32",
              "--clamp-quantile", "0.99", "-q"], capsys)
        got2 = _lora_deltas(out2)
        d = diffs[ATTN_K].double().reshape(diffs[ATTN_K].shape[0], -1)
        assert float((got2[EXTRACTED[ATTN_K]] - d).norm() / d.norm()) > 1e-3


def test_energy_rank_mode_picks_the_smallest_rank_keeping_the_energy(tuned, tmp_path, capsys):
    base, tuned_path, diffs = tuned
    out = tmp_path / "en.safetensors"
    rep = _run(["lora", "extract", tuned_path, base, "-o", out, "--rank", 8, "--conv-rank", 8, "--dtype", "fp32",
                "--rank-mode", "energy", "--energy", "0.9", "-q"], capsys)
    by_name = {x["name"]: x for x in rep["layer_report"]}
    sd = load_state_dict(out)
    for key, name in EXTRACTED.items():
        s = torch.linalg.svdvals(diffs[key].double().reshape(diffs[key].shape[0], -1))
        cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        k = next(i + 1 for i in range(len(cum)) if cum[i] >= 0.9)
        assert sd[name + ".lora_down.weight"].shape[0] == k == by_name[name]["rank"]
        assert by_name[name]["energy"] == pytest.approx(float(cum[k - 1]), abs=1e-5)
        assert float(sd[name + ".alpha"]) == k


def test_randomized_svd_error_is_close_to_the_optimal():
    """On a decaying spectrum (as a fine-tune's difference has) the randomised truncation's error is within 1 % of
    the optimal one (the full SVD's), and on an exactly low-rank matrix it is exact."""
    from lib_sdtoolkit.lora import lowrank

    g = torch.Generator().manual_seed(3)
    m, n, r = 320, 1440, 16
    u = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=g)).Q
    s = 1.0 / torch.arange(1, m + 1, dtype=torch.float32) ** 0.8
    a = (u * s) @ v.T
    tr = lowrank.truncated(a, r, mode="randomized")
    assert tr.method == "randomized" and tr.rank == r
    opt = float(torch.sqrt((s[r:].double() ** 2).sum()))
    err = float((a - tr.up @ tr.down).double().norm())
    assert opt <= err * (1 + 1e-4) and err <= opt * 1.01, (err, opt)
    low = a[:, :5] @ torch.randn(5, n, generator=g)
    tr = lowrank.truncated(low, r, mode="randomized")
    assert float((low - tr.up @ tr.down).norm() / low.norm()) < 1e-5
    # the same input gives the same factors (seeded test matrix)
    again = lowrank.truncated(a, r, mode="randomized")
    assert torch.equal(again.up, lowrank.truncated(a, r, mode="randomized").up)


# ------------------------------------------------------------------------------------------------ 2. resize
@pytest.fixture(scope="module")
def lora8(shapes, tmp_path_factory):
    sd = make_lora_state_dict(shapes.get, "SD1", rank=8, alpha=4, seed=11,
                              name_filter=lambda n: attention_and_conv(n) and ("down_blocks_1" in n or "attn2" in n))
    d = tmp_path_factory.mktemp("surgery_resize")
    return save_safetensors(d / "r8.safetensors", sd, {"ss_output_name": "r8"}), sd


def test_resize_equals_the_truncated_svd_of_each_delta(lora8, tmp_path, capsys):
    path, sd = lora8
    out = tmp_path / "r3.safetensors"
    rep = _run(["lora", "resize", path, "-o", out, "--rank", 3, "-q"], capsys)
    before, after = _lora_deltas(path), _lora_deltas(out)
    assert set(before) == set(after) and rep["layers"] == len(before) and rep["kept_as_is"] == 0
    new = load_state_dict(out)
    energy = {x["name"]: x["energy"] for x in rep["layer_report"]}
    convs = 0
    for m, d in before.items():
        ref, s = _svd_truncate(d, 3)
        torch.testing.assert_close(after[m], ref, rtol=1e-4, atol=1e-6 * float(s[0]))
        assert energy[m] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), abs=1e-5)
        assert float(new[m + ".alpha"]) == pytest.approx(4 / 8 * 3)   # scale alpha/rank kept
        assert new[m + ".lora_down.weight"].shape[0] == 3
        if sd[m + ".lora_down.weight"].dim() == 4:
            assert new[m + ".lora_down.weight"].shape[1:] == sd[m + ".lora_down.weight"].shape[1:]
            assert new[m + ".lora_up.weight"].shape[2:] == (1, 1)
            convs += new[m + ".lora_down.weight"].shape[2] == 3
    assert convs > 0
    assert rep["size_after"] < rep["size_before"] == path.stat().st_size
    with open_model(out) as r:
        assert r.metadata["ss_network_dim"] == "3" and r.metadata["ss_output_name"] == "r8"


def _kohya_rank(s, method, p, cap):
    """kohya's dynamic rules written out (sd-scripts resize_lora.py)."""
    s = [float(x) for x in s]
    if method == "sv_ratio":
        k = sum(1 for x in s if x > s[0] / p)
    elif method == "sv_fro":
        tot, acc, k = sum(x * x for x in s), 0.0, 0
        while math.sqrt(acc / tot) < p - 1e-12:
            acc += s[k] ** 2
            k += 1
    else:
        tot, acc, k = sum(s), 0.0, 0
        while acc / tot < p - 1e-12:
            acc += s[k]
            k += 1
    return max(1, min(k, cap))


@pytest.mark.parametrize("method,p", [("sv_ratio", 3.0), ("sv_fro", 0.9), ("sv_cumulative", 0.6)])
def test_resize_dynamic_methods(lora8, tmp_path, capsys, method, p):
    path, _ = lora8
    out = tmp_path / f"{method}.safetensors"
    rep = _run(["lora", "resize", path, "-o", out, "--rank", 6, "--dynamic-method", method, "--dynamic-param", p,
                "-q"], capsys)
    before, after = _lora_deltas(path), _lora_deltas(out)
    ranks = {x["name"]: x["rank"] for x in rep["layer_report"]}
    seen = set()
    for m, d in before.items():
        ref_full, s = _svd_truncate(d, 8)
        k = _kohya_rank(s[:8], method, p, 6)
        assert ranks[m] == k, (m, ranks[m], k)
        seen.add(k)
        ref, _ = _svd_truncate(d, k)
        torch.testing.assert_close(after[m], ref, rtol=1e-4, atol=1e-6 * float(s[0]))
    assert len(seen) > 1 or method == "sv_ratio"


def test_resize_refuses_bad_parameters(lora8, tmp_path, capsys):
    path, _ = lora8
    assert cli.main(["lora", "resize", str(path), "-o", str(tmp_path / "x"), "--rank", "2", "--dynamic-method",
                     "sv_fro"]) == 2
    assert "needs dynamic_param" in capsys.readouterr().err
    assert cli.main(["lora", "resize", str(path), "-o", str(tmp_path / "x"), "--rank", "2", "--dynamic-method",
                     "sv_ratio", "--dynamic-param", "0.5"]) == 2
    assert "ratio must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


# ------------------------------------------------------------------------------------------------ 3. merge
@pytest.fixture(scope="module")
def two_loras(shapes, tmp_path_factory):
    d = tmp_path_factory.mktemp("surgery_merge")
    one = make_lora_state_dict(shapes.get, "SD1", rank=4, alpha=2, seed=21, name_filter=lambda n: "attn2" in n)
    two = make_lora_state_dict(shapes.get, "SD1", rank=6, alpha=6, seed=22,
                               name_filter=lambda n: "attn2" in n or "down_blocks_1_resnets_0_conv" in n)
    return (save_safetensors(d / "one.safetensors", one, {"ss_output_name": "one", "ss_base_model_version": "sd_v1"}),
            save_safetensors(d / "two.safetensors", two, {"ss_output_name": "two"}))


def test_merge_without_rank_is_exact_and_keeps_the_inputs_metadata(two_loras, tmp_path, capsys):
    one, two = two_loras
    out = tmp_path / "m.safetensors"
    rep = _run(["lora", "merge", f"{one}:0.7", f"{two}:-0.4", "-o", out, "-q"], capsys)
    d1, d2, dm = _lora_deltas(one), _lora_deltas(two), _lora_deltas(out)
    assert set(dm) == set(d1) | set(d2) and rep["layers"] == len(dm)
    for m in dm:
        want = 0.7 * d1.get(m, 0) + (-0.4) * d2[m]
        torch.testing.assert_close(dm[m], want, rtol=1e-5, atol=1e-7)
    sd = load_state_dict(out)
    assert sd[next(iter(d1)) + ".lora_down.weight"].shape[0] == 10   # ranks 4 + 6 concatenated
    assert {v.dtype for v in sd.values()} == {torch.float32}
    with open_model(out) as r:
        src = json.loads(r.metadata["sdtoolkit_merged_from"])
        assert r.metadata["ss_base_model_version"] == "sd_v1"
    assert [(x["file"], x["weight"]) for x in src] == [("one.safetensors", 0.7), ("two.safetensors", -0.4)]
    assert src[0]["metadata"]["ss_output_name"] == "one" and src[1]["metadata"]["ss_output_name"] == "two"


def test_merge_with_rank_is_the_best_approximation_of_the_sum(two_loras, tmp_path, capsys):
    one, two = two_loras
    out = tmp_path / "m3.safetensors"
    rep = _run(["lora", "merge", f"{one}:0.5", str(two), "-o", out, "--rank", 3, "-q"], capsys)
    d1, d2, dm = _lora_deltas(one), _lora_deltas(two), _lora_deltas(out)
    energy = {x["name"]: x["energy"] for x in rep["layer_report"]}
    for m in dm:
        ref, s = _svd_truncate(0.5 * d1.get(m, 0) + d2[m], 3)
        torch.testing.assert_close(dm[m], ref, rtol=1e-4, atol=1e-6 * float(s[0]))
        assert energy[m] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), abs=1e-5)


def _loha(shapes, names_keys, rank, seed, flat_conv=True):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, key in names_keys.items():
        s = shapes[key]
        cols = int(math.prod(s[1:]))
        for h in ("1", "2"):
            sd[f"{name}.hada_w{h}_a"] = torch.randn(s[0], rank, generator=g) * 0.1
            sd[f"{name}.hada_w{h}_b"] = torch.randn(rank, cols, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    return sd


def test_merge_loha_through_its_full_delta(two_loras, shapes, tmp_path, capsys):
    """A LoHa input (a linear and a 3x3 conv stored flattened, as LyCORIS does): the merged delta equals
    w · (alpha/r)·(w1a@w1b)⊙(w2a@w2b) + the LoRA's, and the conv comes back 4-D."""
    one, _ = two_loras
    names = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ATTN_K,
             "lora_unet_down_blocks_1_resnets_0_conv1": CONV}
    loha = _loha(shapes, names, 2, 31)
    lp = save_safetensors(tmp_path / "loha.safetensors", loha)
    out = tmp_path / "ml.safetensors"
    _run(["lora", "merge", f"{lp}:0.5", str(one), "-o", out, "-q"], capsys)
    d1, dm = _lora_deltas(one), _lora_deltas(out)
    sd = load_state_dict(out)
    for name, key in names.items():
        h = (loha[f"{name}.hada_w1_a"] @ loha[f"{name}.hada_w1_b"]) * (loha[f"{name}.hada_w2_a"] @ loha[f"{name}.hada_w2_b"])
        want = 0.5 * (1 / 2) * h.double() + d1.get(name, 0)
        torch.testing.assert_close(dm[name], want, rtol=1e-4, atol=1e-6)
        assert tuple(sd[name + ".lora_down.weight"].shape[1:]) == tuple(shapes[key][1:])
    assert sd["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].dim() == 4


def test_merge_refuses_what_is_no_lora_delta(two_loras, shapes, tmp_path, capsys):
    one, _ = two_loras
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    out_dim = shapes[ATTN_K][0]
    oft = save_safetensors(tmp_path / "oft.safetensors", {f"{name}.oft_blocks": torch.zeros(4, out_dim // 4,
                                                                                              out_dim // 4),
                                                          f"{name}.alpha": torch.tensor(1e-3)})
    assert cli.main(["lora", "merge", str(one), str(oft), "-o", str(tmp_path / "bad"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "OFT module" in err and "oft.safetensors" in err and name in err
    assert not list(tmp_path.glob("bad*"))


# ------------------------------------------------------------------------------------------------ 6. OFT / BOFT
def _oft_kohya_reference(w, blocks, alpha):
    """A1111 network_oft.py (kohya OFT), written out: Cayley of the norm-constrained skew part, per block
    W'_b = R_bᵀ W_b."""
    w = w.double()
    k, n, _ = blocks.shape
    q = blocks.double() - blocks.double().transpose(1, 2)
    norm = float(torch.sqrt((q ** 2).sum()))
    c = alpha * w.shape[0]
    q = q * ((min(norm, c) + 1e-8) / (norm + 1e-8))
    new = torch.empty_like(w)
    eye = torch.eye(n, dtype=torch.float64)
    for b in range(k):
        r = torch.linalg.solve((eye - q[b]).T, (eye + q[b]).T).T  # (I+Q)(I-Q)^-1
        new[b * n:(b + 1) * n] = torch.einsum("jm,j...->m...", r, w[b * n:(b + 1) * n])
    return new - w


def _boft_reference(w, blocks, alpha, rescale):
    """BOFT (LyCORIS / ComfyUI) with explicit butterfly permutation matrices: W' = Π_i Pᵢᵀ Bᵢ Pᵢ W, then rescale."""
    w = w.double()
    out = w.shape[0]
    m, kb, b, _ = blocks.shape
    q = blocks.double() - blocks.double().transpose(-1, -2)
    qn = float(torch.sqrt((q ** 2).sum())) + 1e-8
    if alpha > 0 and qn > alpha:
        q = q * (alpha / qn)
    eye = torch.eye(b, dtype=torch.float64)
    total = torch.eye(out, dtype=torch.float64)
    for i in range(m):
        stride = 2 ** i * (b // 2)
        perm = []  # row order after the butterfly shuffle: within groups of 2·stride, interleave the two halves
        for g0 in range(0, out, 2 * stride):
            for j in range(stride):
                perm += [g0 + j, g0 + stride + j]
        p_mat = torch.zeros(out, out, dtype=torch.float64)
        p_mat[torch.arange(out), torch.tensor(perm)] = 1.0
        rot = torch.block_diag(*[(eye + q[i, g]) @ torch.linalg.inv(eye - q[i, g]) for g in range(kb)])
        total = p_mat.T @ rot @ p_mat @ total
    new = (total @ w.reshape(out, -1)).reshape(w.shape)
    if rescale is not None:
        new = new * rescale.double().reshape(out, *[1] * (w.dim() - 1))
    return new - w


def test_oft_and_boft_deltas_match_the_formulas():
    from lib_sdtoolkit.lora import formats

    g = torch.Generator().manual_seed(41)
    for shape in ((32, 24), (32, 16, 3, 3)):
        w = torch.randn(*shape, generator=g)
        # kohya OFT: a constraint that bites (alpha small) and one that does not
        for alpha in (1e-4, 10.0):
            blocks = torch.randn(4, 8, 8, generator=g) * 0.05
            layer = formats.make_layer("m", {"oft_blocks": blocks, "alpha": torch.tensor(alpha)})
            assert layer.kind == "oft" and layer.effective_scale() == 1.0
            dw, _ = formats.compute_delta(layer, w)
            torch.testing.assert_close(dw.double(), _oft_kohya_reference(w, blocks, alpha), rtol=1e-4, atol=1e-5)
        # LyCORIS oft_diag: the blocks are R itself
        r = torch.randn(8, 4, 4, generator=g)
        dw, _ = formats.compute_delta(formats.make_layer("m", {"oft_diag": r}), w)
        ref = torch.cat([r[b].double().T @ w[b * 4:(b + 1) * 4].double().reshape(4, -1) for b in range(8)]
                        ).reshape(w.shape) - w.double()
        torch.testing.assert_close(dw.double(), ref, rtol=1e-5, atol=1e-5)
        # BOFT: 3 butterfly stages of 8 blocks of 4 rows, with and without rescale / constraint
        for alpha, rescale in ((0.0, None), (0.05, torch.rand(shape[0], 1, generator=g) + 0.5)):
            blocks = torch.randn(3, 8, 4, 4, generator=g) * 0.1
            parts = {"oft_blocks": blocks, "alpha": torch.tensor(alpha)}
            if rescale is not None:
                parts["rescale"] = rescale
            layer = formats.make_layer("m", parts)
            assert layer.kind == "oft"
            dw, _ = formats.compute_delta(layer, w)
            torch.testing.assert_close(dw.double(), _boft_reference(w, blocks, alpha, rescale), rtol=1e-4,
                                       atol=1e-5)


def test_oft_file_baked_and_inspected(fixture_files, shapes, tmp_path, capsys):
    """An OFT file goes through the loaders: bake writes W + ΔW(W) (ΔW from the formula above), inspect names the
    type (boft apart) and needs the checkpoint for its strength."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    out_dim = shapes[ATTN_K][0]
    g = torch.Generator().manual_seed(5)
    blocks = torch.randn(4, out_dim // 4, out_dim // 4, generator=g) * 0.05
    bname = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    bblocks = torch.randn(2, out_dim // 4, 4, 4, generator=g) * 0.1
    p = save_safetensors(tmp_path / "oft.safetensors", {f"{name}.oft_blocks": blocks, f"{name}.alpha":
                                                        torch.tensor(1e-3), f"{bname}.oft_blocks": bblocks})
    out = tmp_path / "baked.safetensors"
    assert cli.main(["lora", "bake", str(fixture_files["sd1"]), f"{p}:1", "-o", str(out), "-q"]) == 0
    b0, b1 = load_state_dict(fixture_files["sd1"]), load_state_dict(out)
    torch.testing.assert_close((b1[ATTN_K] - b0[ATTN_K]).double(),
                               _oft_kohya_reference(b0[ATTN_K], blocks, 1e-3), rtol=1e-4, atol=1e-6)
    vk = ATTN_K.replace("to_k", "to_v")
    torch.testing.assert_close((b1[vk] - b0[vk]).double(), _boft_reference(b0[vk], bblocks, 0.0, None),
                               rtol=1e-4, atol=1e-6)
    rep = _run(["lora", "inspect", p], capsys)
    assert rep["types"] == {"oft": 1, "boft": 1} and rep["not_applied"] == []
    assert rep["blocks"]["IN01"]["layers"] == 2 and rep["blocks"]["IN01"]["norm"] == 0  # needs the model
    rep = _run(["lora", "inspect", p, "--model", fixture_files["sd1"]], capsys)
    want = float(_oft_kohya_reference(b0[ATTN_K], blocks, 1e-3).norm()
                 + _boft_reference(b0[vk], bblocks, 0.0, None).norm())
    assert rep["blocks"]["IN01"]["norm"] == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------------------------ 5. explain
@pytest.fixture(scope="module")
def explain_files(shapes, fixture_files, tmp_path_factory):
    """One file per reason a module is not applied, each also holding good modules."""
    d = tmp_path_factory.mktemp("surgery_explain")
    good = make_lora_state_dict(shapes.get, "SD1", rank=2, seed=51, name_filter=lambda n: "attn1_to_q" in n)
    files = {}
    sd = dict(good)  # a name no SD1 layer has (down_blocks_9)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 2)
    sd["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 8)
    files["unknown target name"] = save_safetensors(d / "unknown_name.safetensors", sd)
    sd = dict(good)  # GLoRA parts: a type the WebUI knows and the toolkit does not read
    for part in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"):
        sd[f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.{part}"] = torch.zeros(4, 4)
    files["unsupported type"] = save_safetensors(d / "glora.safetensors", sd)
    sd = dict(good)  # a LoRA made for a wider model: lora_down's in-features do not fit
    out_dim, in_dim = shapes[ATTN_K]
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"] = torch.zeros(out_dim, 2)
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.zeros(
        2, in_dim * 2)
    files["shape mismatch"] = save_safetensors(d / "wide.safetensors", sd)
    with open_model(fixture_files["sdxl"]) as r:
        xl = {k: tuple(i.shape) for k, i in r.infos().items()}
    sd = make_lora_state_dict(xl.get, "SDXL", rank=2, seed=52, name_filter=lambda n: "attn2_to_k" in n)
    files["wrong architecture"] = save_safetensors(d / "sdxl.safetensors", sd,
                                                   {"ss_base_model_version": "sdxl_base_v1.0"})
    return files, good


@pytest.mark.parametrize("reason", ["unknown target name", "unsupported type", "shape mismatch",
                                    "wrong architecture"])
def test_inspect_explains_every_module_that_would_not_apply(explain_files, fixture_files, capsys, reason):
    files, good = explain_files
    rep = _run(["lora", "inspect", files[reason], "--model", fixture_files["sd1"]], capsys)
    assert set(rep["not_applied_counts"]) == {reason}, rep["not_applied"]
    if reason == "wrong architecture":
        assert rep["not_applied_counts"][reason] == len({k.split(".")[0] for k in load_state_dict(files[reason])})
        assert "SDXL" in rep["not_applied"][0]["detail"]
    else:
        assert rep["not_applied_counts"][reason] == 1
        assert rep["targets"]["unet"] >= len(good) // 3
    # the text names the module and the reason
    capsys.readouterr()
    assert cli.main(["lora", "inspect", str(files[reason]), "--model", str(fixture_files["sd1"])]) == 0
    text = capsys.readouterr().out
    assert "NOT APPLIED" in text and reason in text and rep["not_applied"][0]["module"] in text
    # without a checkpoint only what the names and types say
    rep = _run(["lora", "inspect", files[reason]], capsys)
    if reason in ("unknown target name", "unsupported type"):
        assert set(rep["not_applied_counts"]) == {reason}
    else:
        assert rep["not_applied"] == []


def test_a_partly_applied_lora_is_a_warning_with_the_reasons(explain_files, tiny_modules, caplog):
    """The WebUI path (LoraPatcher under scripts/sdtoolkit_lora.py): a network whose modules apply in part says
    which are left out and why, once."""
    import logging

    from lib_sdtoolkit.lora.apply import ActiveNetwork, LoraPatcher, ModelBinding
    from lib_sdtoolkit.lora.network import load_network

    files, _ = explain_files
    sd1 = tiny_modules("SD1")
    binding = ModelBinding.from_parts("SD1", unet=sd1["unet"], text_encoder=sd1["text_encoder"])
    p = LoraPatcher(binding)
    try:
        for reason in ("unknown target name", "unsupported type"):
            net = load_network(files[reason], "SD1")
            with caplog.at_level(logging.WARNING, logger="lib_sdtoolkit.lora.apply"):
                caplog.clear()
                res = p.set_networks([ActiveNetwork(net)])
                assert res.applied == [net.name] and len(res.warnings) == 1
                assert "applies partly: 1 of" in res.warnings[0] and reason in res.warnings[0]
                assert any(reason in r.getMessage() for r in caplog.records)
                caplog.clear()
                p.set_networks([])
                res = p.set_networks([ActiveNetwork(net)])
                assert not [r for r in caplog.records if "applies partly" in r.getMessage()]  # said once
    finally:
        p.restore_all()
