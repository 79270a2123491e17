"""LoRA backups that do not keep a second copy of the touched weights (issue 17.1): restore from the checkpoint
file, spill to a temporary file, RAM as the fallback. Each kind: bit-exact after apply / switch / reweight /
restore sequences on the real tiny SD1.5 ldm UNet + CLIP, the patched values identical across kinds, and the
fallbacks taken where the file cannot vouch for a weight."""

import os

import pytest
import torch

from lib_sdtoolkit.files import save_safetensors
from lib_sdtoolkit.lora.apply import ActiveNetwork, LoraPatcher, ModelBinding
from lib_sdtoolkit.lora.backups import LoraBackupError
from lib_sdtoolkit.lora.network import load_network
from lib_sdtoolkit.lora.synth import make_lora_state_dict


#: tiny models: one torch thread (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(dtype=torch.float32):
    """A fresh tiny SD1.5 ldm UNet + CLIP whose values are fp16-representable (as if loaded from an fp16 file)."""
    from lib_sdtoolkit.samples import factory

    mods = factory.build_modules("SD1", "tiny", seed=0)
    with torch.no_grad():
        for m in (mods["unet"], mods["text_encoder"]):
            for p in m.parameters():
                p.copy_(p.half().float())
            m.to(dtype)
    return mods


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("backups")
    mods = _model()
    bind = ModelBinding.from_parts("SD1", unet=mods["unet"], text_encoder=mods["text_encoder"])
    # the checkpoint file the weights "were loaded from": fp16, checkpoint keys
    ckpt = save_safetensors(d / "model.safetensors",
                            {k: getattr(m, a).detach().half().contiguous() for k, (m, a) in bind._params.items()})
    nets = []
    for seed, filt in ((1, None), (2, lambda n: "attn" in n or "self_attn" in n), (3, lambda n: "lora_te" in n),
                       (4, lambda n: n.startswith("lora_unet_"))):
        kw = {"name_filter": filt} if filt else {}
        sd = make_lora_state_dict(bind.target_shape, "SD1", rank=4, seed=seed, **kw)
        nets.append(load_network(save_safetensors(d / f"l{seed}.safetensors", sd), "SD1"))
    return {"dir": d, "mods": mods, "bind": bind, "ckpt": ckpt, "nets": nets}


def _snap(mods):
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate((mods["unet"], mods["text_encoder"]))
            for n, p in m.named_parameters()}


def _same(a, b):
    bad = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8),
                                                                         b[k].view(-1).view(torch.uint8)))]
    return bad


def _sequence(p, nets, mods):
    """apply, switch, same again, reweight, a set of two, partial overlap; the patched states after each step."""
    steps = [[ActiveNetwork(nets[0])], [ActiveNetwork(nets[1])], [ActiveNetwork(nets[1])],
             [ActiveNetwork(nets[1], te=0.7, unet=0.8)], [ActiveNetwork(nets[0]), ActiveNetwork(nets[2], te=0.5)],
             [ActiveNetwork(nets[2])], []]
    states = []
    for s in steps:
        p.set_networks(s)
        states.append(_snap(mods))
    return states


@pytest.mark.parametrize("kind", ["ram", "spill", "file"])
def test_every_kind_restores_bit_exact_and_patches_alike(setup, kind):
    mods, bind = setup["mods"], setup["bind"]
    before = _snap(mods)
    p = LoraPatcher(bind, backup=kind, source=setup["ckpt"] if kind == "file" else None, spill_dir=setup["dir"])
    try:
        states = _sequence(p, setup["nets"], mods)
        assert not _same(states[-1], before)  # the empty set restores everything
        assert _same(states[0], before)       # something was patched
        stats = p.backup_stats
        assert stats["fallbacks"] == [] and stats["kind"] == kind
        p.set_networks([ActiveNetwork(setup["nets"][0])])
        held = p.backup_stats
        if kind == "ram":
            assert held["ram_bytes"] > 0 and held["count"]["ram"] > 0
        else:
            assert held["ram_bytes"] == 0 and held["count"][kind] == len(p._backup) > 0
            assert (held["spill_bytes"] > 0) == (kind == "spill")
        p.restore_all()
        assert _same(_snap(mods), before) == []
        assert p.backup_stats["count"] == {"file": 0, "spill": 0, "ram": 0}
    finally:
        p.close()
    assert _same(_snap(mods), before) == []
    # the same sequence with RAM backups gives the same patched bits at every step
    if kind != "ram":
        r = LoraPatcher(bind, backup="ram")
        try:
            ref = _sequence(r, setup["nets"], mods)
        finally:
            r.close()
        assert all(_same(a, b) == [] for a, b in zip(states, ref))


def test_spill_keeps_no_copy_and_writes_in_place(setup):
    mods, bind = setup["mods"], setup["bind"]
    p = LoraPatcher(bind, backup="spill", spill_dir=setup["dir"])
    try:
        ptrs = {n: q.data_ptr() for n, q in mods["unet"].named_parameters()}
        p.set_networks([ActiveNetwork(setup["nets"][0])])
        assert {n: q.data_ptr() for n, q in mods["unet"].named_parameters()} == ptrs  # no swapped-in copies
        assert p.backup_bytes == 0 and p.backup_stats["spill_bytes"] > 0
        spill_size = os.fstat(p._store._spill.fileno()).st_size
        for _ in range(5):  # switching back and forth reuses the spill extents
            p.set_networks([ActiveNetwork(setup["nets"][1])])
            p.set_networks([ActiveNetwork(setup["nets"][0])])
        assert os.fstat(p._store._spill.fileno()).st_size == spill_size
        p.restore_all()
        assert os.fstat(p._store._spill.fileno()).st_size == 0
    finally:
        p.close()


def test_file_falls_back_per_weight_when_it_differs(setup, tmp_path):
    mods, bind = setup["mods"], setup["bind"]
    before = _snap(mods)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    m, a = bind._params[key]
    with torch.no_grad():  # someone changed this weight after loading: the file no longer vouches for it
        getattr(m, a).add_(1.0)
    changed = _snap(mods)
    try:
        p = LoraPatcher(bind, source=setup["ckpt"], spill_dir=tmp_path)
        assert p.backup_kind == "file"
        p.set_networks([ActiveNetwork(setup["nets"][0])])
        st = p.backup_stats
        assert st["count"]["spill"] == 1 and st["count"]["file"] == len(p._backup) - 1
        assert [n for n, _ in st["fallbacks"]] == [key] and "differs" in st["fallbacks"][0][1]
        p.restore_all()
        assert _same(_snap(mods), changed) == []
        p.close()
    finally:
        with torch.no_grad():
            getattr(m, a).sub_(1.0)
    assert _same(_snap(mods), before) == []


def test_file_changed_before_use_falls_back_and_in_place_change_refuses_restore(setup, tmp_path):
    mods, bind = setup["mods"], setup["bind"]
    before = _snap(mods)
    src = tmp_path / "copy.safetensors"
    src.write_bytes(setup["ckpt"].read_bytes())
    # a source that was replaced by rename after the patcher opened it: the old bytes stay readable
    p = LoraPatcher(bind, source=src, spill_dir=tmp_path)
    tmp = tmp_path / "other.safetensors"
    tmp.write_bytes(b"\0" * 64)
    os.replace(tmp, src)
    p.set_networks([ActiveNetwork(setup["nets"][0])])
    assert p.backup_stats["count"]["spill"] == 0 and p.backup_stats["fallbacks"] == []
    p.close()
    assert _same(_snap(mods), before) == []

    # a source changed in place: weights touched later spill instead; those relying on it refuse to restore
    src2 = tmp_path / "copy2.safetensors"
    src2.write_bytes(setup["ckpt"].read_bytes())
    p = LoraPatcher(bind, source=src2, spill_dir=tmp_path)
    p.set_networks([ActiveNetwork(setup["nets"][2])])   # text encoder only, from the file
    n_file = p.backup_stats["count"]["file"]
    assert n_file > 0
    with open(src2, "r+b") as fh:
        fh.seek(100)
        fh.write(b"x")
    st = os.stat(src2)
    os.utime(src2, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p.set_networks([ActiveNetwork(setup["nets"][2]), ActiveNetwork(setup["nets"][3])])  # + UNet weights
    st = p.backup_stats
    assert st["count"]["file"] == n_file and st["count"]["spill"] > 0
    assert all("changed in place" in why for _, why in st["fallbacks"])
    patched = _snap(mods)
    with pytest.raises(LoraBackupError, match="copy2.safetensors"):
        p.restore_all()
    after = _snap(mods)
    # the weights backed up by the spill file are restored; those only the changed file could restore are not
    te_bad = [k for k in _same(after, before) if k.startswith("1.")]
    assert te_bad and all(k in _same(patched, before) for k in te_bad)
    assert [k for k in _same(after, before) if k.startswith("0.")] == []
    p._store.close()
    with torch.no_grad():  # put the test's model back
        for i, m in enumerate((mods["unet"], mods["text_encoder"])):
            for n, q in m.named_parameters():
                q.copy_(before[f"{i}.{n}"])


def test_fp16_model_from_fp16_file_and_ckpt_source_falls_back(tmp_path):
    mods = _model(torch.float16)
    bind = ModelBinding.from_parts("SD1", unet=mods["unet"], text_encoder=mods["text_encoder"])
    before = _snap(mods)
    sd = {k: getattr(m, a).detach().contiguous() for k, (m, a) in bind._params.items()}
    st = save_safetensors(tmp_path / "m.safetensors", sd)
    net = load_network(save_safetensors(tmp_path / "l.safetensors",
                                        make_lora_state_dict(bind.target_shape, "SD1", rank=4, seed=5)), "SD1")
    p = LoraPatcher(bind, source=st)
    p.set_networks([ActiveNetwork(net)])
    assert p.backup_stats["count"]["file"] == len(p._backup) > 0
    p.close()
    assert _same(_snap(mods), before) == []
    # a .ckpt source cannot be read back per tensor: every weight spills, and says why
    ck = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, ck)
    p = LoraPatcher(bind, source=ck, spill_dir=tmp_path)
    p.set_networks([ActiveNetwork(net)])
    st2 = p.backup_stats
    assert st2["count"]["spill"] == len(p._backup) and "not a safetensors file" in st2["fallbacks"][0][1]
    p.close()
    assert _same(_snap(mods), before) == []


def test_spill_failure_falls_back_to_ram(setup, tmp_path, monkeypatch):
    mods, bind = setup["mods"], setup["bind"]
    before = _snap(mods)
    p = LoraPatcher(bind, backup="spill", spill_dir=tmp_path)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    p.set_networks([ActiveNetwork(setup["nets"][2])])
    st = p.backup_stats
    assert st["count"]["ram"] == len(p._backup) > 0 and "No space left" in st["fallbacks"][0][1]
    monkeypatch.undo()
    p.close()
    assert _same(_snap(mods), before) == []


def test_default_spill_folder_is_on_disk(tmp_path):
    from lib_sdtoolkit.lora import backups

    assert backups._memory_fs("/dev/shm") == (os.path.isdir("/dev/shm") and "tmpfs" in open("/proc/mounts").read())
    d = backups._disk_temp_dir(str(tmp_path / "m.safetensors"))
    assert d is not None and not backups._memory_fs(d)
