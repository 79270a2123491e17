"""ΔW of every network type against an independent implementation: LyCORIS' functional code (PyPI lycoris-lora,
torch backend) where it covers the type, plain torch from the published formula otherwise."""
import pytest
import torch

from lib_sdtoolkit.lora import formats
from lib_sdtoolkit.lora.formats import compute_delta, make_layer

lyc_locon = pytest.importorskip("lycoris.functional.locon")
from lycoris.functional import loha as lyc_loha  # noqa: E402
from lycoris.functional import lokr as lyc_lokr  # noqa: E402
from lycoris.functional.general import weight_decompose  # noqa: E402

G = torch.Generator().manual_seed(1234)


def rnd(*shape):
    return torch.randn(*shape, generator=G)


def delta(parts, weight, dyn=None):
    layer = make_layer("lora_unet_x", parts)
    return compute_delta(layer, weight, dyn)


def test_lora_linear_matches_lycoris():
    up, down, w = rnd(12, 4), rnd(4, 10), rnd(12, 10)
    dw, db = delta({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0)}, w)
    ref = lyc_locon.diff_weight(down, up, None, gamma=3.0 / 4, backend="torch")
    torch.testing.assert_close(dw, ref)
    assert db is None


def test_locon_conv_kxk_matches_lycoris():
    up, down, w = rnd(8, 3, 1, 1), rnd(3, 6, 3, 3), rnd(8, 6, 3, 3)
    dw, _ = delta({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5)}, w)
    ref = lyc_locon.diff_weight(down, up, None, gamma=0.5, backend="torch")
    torch.testing.assert_close(dw, ref)
    # the same through the conv itself (kohya's definition): conv(conv(x, down), up)
    x = rnd(1, 6, 7, 7)
    via_conv = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up) * 0.5
    torch.testing.assert_close(torch.nn.functional.conv2d(x, dw, padding=1), via_conv, rtol=1e-4, atol=1e-4)


def test_locon_cp_mid_matches_lycoris():
    up, down, mid, w = rnd(8, 3, 1, 1), rnd(3, 6, 1, 1), rnd(3, 3, 3, 3), rnd(8, 6, 3, 3)
    dw, _ = delta({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid,
                   "alpha": torch.tensor(3.0)}, w)
    ref = lyc_locon.diff_weight(down, up, mid, gamma=1.0, backend="torch")
    torch.testing.assert_close(dw, ref)


def test_lora_no_alpha_is_scale_one_and_rank_mismatch_refused():
    up, down, w = rnd(5, 2), rnd(2, 4), rnd(5, 4)
    dw, _ = delta({"lora_up.weight": up, "lora_down.weight": down}, w)
    torch.testing.assert_close(dw, up @ down)
    layer = make_layer("lora_te_bad", {"lora_up.weight": rnd(5, 3), "lora_down.weight": rnd(2, 4)})
    with pytest.raises(ValueError, match="rank"):
        formats.check_layer(layer, (5, 4))


def test_dylora_dyn_keeps_first_ranks():
    up, down, w = rnd(6, 8), rnd(8, 5), rnd(6, 5)
    dw, _ = delta({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(8.0)}, w, dyn=3)
    torch.testing.assert_close(dw, up[:, :3] @ down[:3])


@pytest.mark.parametrize("conv", [False, True])
def test_loha_matches_lycoris(conv):
    if conv:
        w = rnd(8, 6, 3, 3)
        w1a, w1b, w2a, w2b = rnd(8, 4), rnd(4, 6 * 9), rnd(8, 4), rnd(4, 6 * 9)
    else:
        w = rnd(8, 6)
        w1a, w1b, w2a, w2b = rnd(8, 4), rnd(4, 6), rnd(8, 4), rnd(4, 6)
    dw, _ = delta({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                   "alpha": torch.tensor(2.0)}, w)
    ref = lyc_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=0.5, backend="torch").reshape(w.shape)
    torch.testing.assert_close(dw, ref)


def test_loha_tucker_matches_lycoris():
    w = rnd(8, 6, 3, 3)
    t1, t2 = rnd(4, 4, 3, 3), rnd(4, 4, 3, 3)
    w1a, w1b, w2a, w2b = rnd(4, 8), rnd(4, 6), rnd(4, 8), rnd(4, 6)  # LyCORIS tucker layout: (r, out), (r, in)
    dw, _ = delta({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                   "hada_t1": t1, "hada_t2": t2, "alpha": torch.tensor(4.0)}, w)
    ref = lyc_loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=1.0, backend="torch")
    torch.testing.assert_close(dw, ref)


LOKR_CASES = {
    # name: (weight shape, parts)
    "w1 full, w2 low-rank (linear)": ((12, 20), dict(lokr_w1=(3, 4), lokr_w2_a=(4, 2), lokr_w2_b=(2, 5))),
    "both decomposed (linear)": ((12, 20), dict(lokr_w1_a=(3, 2), lokr_w1_b=(2, 4), lokr_w2_a=(4, 2),
                                               lokr_w2_b=(2, 5))),
    "both full (linear)": ((12, 20), dict(lokr_w1=(3, 4), lokr_w2=(4, 5))),
    "conv w2 full": ((12, 20, 3, 3), dict(lokr_w1=(3, 4), lokr_w2=(4, 5, 3, 3))),
    "conv w2 low-rank flattened": ((12, 20, 3, 3), dict(lokr_w1=(3, 4), lokr_w2_a=(4, 2), lokr_w2_b=(2, 45))),
    "conv w2 tucker": ((12, 20, 3, 3), dict(lokr_w1=(3, 4), lokr_w2_a=(2, 4), lokr_w2_b=(2, 5),
                                           lokr_t2=(2, 2, 3, 3))),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_factorisations_match_lycoris(case):
    shape, spec = LOKR_CASES[case]
    parts = {k: rnd(*s) for k, s in spec.items()}
    alpha = 3.0
    dw, _ = delta(dict(parts, alpha=torch.tensor(alpha)), rnd(*shape))
    g = parts.get
    gamma = alpha
    if "lokr_t2" in parts:
        # lycoris.functional.lokr divides by w2_a.shape[1], which in the Tucker layout (r, b) is b, not the rank;
        # the LyCORIS module (and the WebUI) use alpha / lora_dim. Feed gamma so that both mean alpha / rank.
        gamma = alpha / parts["lokr_w2_b"].shape[0] * parts["lokr_w2_a"].shape[1]
    ref = lyc_lokr.diff_weight(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"),
                               g("lokr_w2_b"), g("lokr_t2"), gamma=gamma, backend="torch")
    if "lokr_w1_a" not in parts and "lokr_w2_a" not in parts:
        ref = lyc_lokr.diff_weight(g("lokr_w1"), None, None, g("lokr_w2"), None, None, None, gamma=1.0,
                                   backend="torch")  # both full: LyCORIS forces scale 1
    torch.testing.assert_close(dw, ref.reshape(shape))


@pytest.mark.parametrize("on_out", [True, False])
@pytest.mark.parametrize("conv", [False, True])
def test_dora_both_conventions_match_lycoris(on_out, conv):
    w = rnd(8, 6, 3, 3) if conv else rnd(8, 6)
    up = rnd(8, 3, 1, 1) if conv else rnd(8, 3)
    down = rnd(3, 6, 3, 3) if conv else rnd(3, 6)
    tail = [1] * (w.dim() - 2)
    ds = (rnd(8, 1, *tail).abs() + 0.5) if on_out else (rnd(1, 6, *tail).abs() + 0.5)
    dw, _ = delta({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.5), "dora_scale": ds}, w)
    plain = lyc_locon.diff_weight(down, up, None, gamma=0.5, backend="torch")
    ref = weight_decompose(w + plain, ds, 1, wd_on_out=on_out, backend="torch") - w
    torch.testing.assert_close(dw, ref, rtol=1e-4, atol=1e-5)


def test_dora_ambiguous_shape_refused():
    """A shape that fits neither axis (or both, 2-D) is refused; a flat one is PEFT's per-output magnitude, also on a
    square weight (PEFT writes it per output row; the hosts' weight_decompose reads ``shape[0] == rows`` so)."""
    with pytest.raises(ValueError, match="dora_scale"):
        formats.dora_on_out(rnd(5), (6, 4))
    with pytest.raises(ValueError, match="dora_scale"):
        formats.dora_on_out(rnd(1, 1), (1, 1))
    assert formats.dora_on_out(rnd(6), (6, 6)) is True   # PEFT on a square weight (a Flux q/k/v slice)
    assert formats.dora_on_out(rnd(6), (6, 4)) is True   # PEFT's flat per-output magnitude
    assert formats.dora_on_out(rnd(4), (6, 4)) is False


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_formula(on_input):
    w, v = rnd(5, 7), rnd(7 if on_input else 5)
    parts = {"weight": v}
    if on_input:
        parts["on_input"] = torch.tensor(1)
    dw, _ = delta(parts, w)
    x = rnd(3, 7)
    y_new = torch.nn.functional.linear(x, w + dw)
    # published formula: scale the input features (on_input) or the output features by (1 + w)
    ref = torch.nn.functional.linear(x * (1 + v), w) if on_input else torch.nn.functional.linear(x, w) * (1 + v)
    torch.testing.assert_close(y_new, ref, rtol=1e-4, atol=1e-5)


def test_full_and_norm_deltas():
    w, d, db = rnd(4, 3), rnd(4, 3), rnd(4)
    dw, dbias = delta({"diff": d, "diff_b": db}, w)
    assert torch.equal(dw, d) and torch.equal(dbias, db)
    dw, dbias = delta({"w_norm": rnd(8), "b_norm": rnd(8)}, rnd(8))
    assert dw.shape == (8,) and dbias.shape == (8,)
    assert formats.classify({"w_norm", "b_norm"}) == "norm"
    assert formats.classify({"oft_blocks"}) == "oft"  # OFT/BOFT: tests/test_lora_surgery.py
    assert formats.classify({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}) is None  # GLoRA: not read
