"""The bench machinery (bench/_common.py, bench/run_all.py): alternation, per-round ratios, page-cache control,
whole-command measurement and the table. No timing assertions: only that what the benches print is what happened.

(``python bench/run_all.py --size tiny`` itself takes minutes on a loaded 2-core machine -- every side is a whole
command with a 4-20 s start-up -- so it is not run here.)"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402
import run_all  # noqa: E402


def test_alternate_rotates_order_and_ratios_are_per_round():
    calls = []

    def side(name, values):
        it = iter(values)

        def fn():
            calls.append(name)
            return {"seconds": next(it)}
        return C.Side(name, fn)

    r = C.alternate([side("A", [1.0, 4.0, 9.0]), side("B", [2.0, 2.0, 3.0])], 3, log=lambda s: None)
    assert calls == ["A", "B", "B", "A", "A", "B"]
    assert r.values("A", "seconds") == [1.0, 4.0, 9.0]
    assert C.ratios(r, "A", "B", "seconds") == [0.5, 2.0, 3.0]
    assert C.fmt_ratio(C.ratios(r, "A", "B", "seconds")) == "2.00x [0.50-3.00]"
    assert C.fmt_mmm(r.values("A", "seconds")) == "4.00 s [1.00-9.00]"
    assert len(r.loads) == 3
    row = C.row_for(r, "b", "m", "A", "B", "seconds", "ok", "warm", "cmd", target=C.target_text(2.0, 1.3))
    assert row.ratio == "2.00x [0.50-3.00]" and "missed" in row.target
    back = C.Rounds.from_json(r.to_json())
    assert C.ratios(back, "A", "B", "seconds") == [0.5, 2.0, 3.0]


def _fstype(path: Path) -> str:
    """The file system type of the mount holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mnt, fs = parts[1], parts[2]
                if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                    best, kind = mnt, fs
    except OSError:
        pass
    return kind


def test_residency_warm_and_evict(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(4 << 20))
    C.warm([p])
    assert C.residency([p]) == 1.0
    C.evict([p])
    if _fstype(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("tmp_path is on a file system that keeps files in memory: nothing to evict")
    assert 0.0 <= C.residency([p]) < 1.0
    assert C.residency([tmp_path / "missing"]) != C.residency([tmp_path / "missing"])  # NaN: nothing to tell


def test_run_command_reports_wall_rss_and_failures(tmp_path):
    r = C.run_command([sys.executable, "-c", "x = bytearray(64 << 20); print('done')"])
    assert r["stdout"].strip() == "done" and r["wall"] > 0
    if C.TIME_BIN:
        assert r["rss_mb"] >= 60
    with pytest.raises(C.CommandFailed, match="exited 3"):
        C.run_command([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_run_command_reports_cpu_seconds_of_the_command_and_the_machine():
    # a child that spins ~0.4 s of CPU (by its own clock) and one that sleeps 0.4 s
    spin = C.run_command([sys.executable, "-c", "import time\nt = time.process_time()\n"
                          "while time.process_time() - t < 0.4: pass"])
    nap = C.run_command([sys.executable, "-c", "import time; time.sleep(0.4)"])
    if C.TIME_BIN:
        assert spin["cpu_user"] + spin["cpu_sys"] >= 0.35
        assert nap["cpu_user"] + nap["cpu_sys"] < spin["cpu_user"] + spin["cpu_sys"] - 0.2
        f = C.cpu_fields(spin)
        assert abs(f["cpu_s"] - (spin["cpu_user"] + spin["cpu_sys"])) < 1e-9
    m = C.machine_cpu()
    if not m:
        pytest.skip("no /proc/stat here: the machine's CPU states are not available")
    assert set(m) == set(C._CPU_STATES) and all(v >= 0 for v in m.values())
    # over the spinning run the machine was busy for at least the child's own CPU time (less a clock tick)
    f = C.cpu_fields(spin)
    assert f["m_busy"] >= 0.35 - 2 / os.sysconf("SC_CLK_TCK") - 0.05
    # and all states together cover the wall time on every core /proc/stat counts (within the clock's ticks)
    with open("/proc/stat") as fh:
        cores = sum(1 for line in fh if line.startswith("cpu") and line[3:4].isdigit())
    total = sum(spin["machine"].values())
    assert total >= spin["wall"] * 0.5 * max(1, cores) - 0.1


def test_table_has_every_row_and_the_command(tmp_path):
    rows = [C.Row("merge x", "ours vs floor", "ours: 1 s", "floor: 1 s", "1.00x [1.00-1.00]", "equal", "cold", "cmd a"),
            C.Row("hash y", "a | b", "o", "b", "2.00x", "eq", "warm", "cmd b", loads="1.0, 2.0")]
    out = tmp_path / "t.md"
    text = run_all.write_table(out, "python bench/run_all.py --size tiny", "tiny", C.machine_facts(),
                               C.machine_facts(), [("python bench/x.py", rows, 1.0)])
    assert out.read_text() == text
    lines = [ln for ln in text.splitlines() if ln.startswith("| merge x") or ln.startswith("| hash y")]
    assert len(lines) == 2 and "a \\| b" in lines[1] and "`cmd a`" in lines[0]
    assert "python bench/run_all.py --size tiny" in text and "load average" in text


def test_run_all_refuses_an_unknown_bench(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"])
    assert "unknown bench nope" in capsys.readouterr().err


def test_run_all_reaches_every_bench_with_flags_it_accepts():
    """Issue 18.3: one command for every bench. Each bench's script exists and its argparse accepts the flags
    run_all passes (flux_merge takes --max-gb, the SVD bench --min-rows); the SVD bench's totals line becomes a
    row with the ratio randomised/full."""
    import subprocess

    for name in run_all.BENCHES:
        argv = run_all.bench_argv(name, "tiny", 3, "/nonexistent-rows.json")
        assert Path(argv[1]).is_file(), name
        if name not in ("flux_merge", "svd", "whole"):  # the others: --size/--rounds/--rows (most via size_arg)
            src = Path(argv[1]).read_text()
            assert "C.size_arg(ap)" in src or all(f'"{f}"' in src for f in ("--size", "--rounds", "--rows")), name
            continue
        flags = [a for a in argv[2:] if a.startswith("--")]
        helptext = subprocess.run([sys.executable, argv[1], "--help"], capture_output=True, text=True,
                                  cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        for f in flags:
            assert f in helptext or f == "--rows", (name, f)
    rows = run_all.svd_rows(["noise", "total over every layer: full 120.0 s, randomized 30.0 s, speed-up 4.0x; "
                                      "largest error ratio 1.00012 (1 = the full SVD's error)"], "cmd", "tiny")
    assert len(rows) == 1 and rows[0].ratio.startswith("0.25x") and "1.00012" in rows[0].check
    assert run_all.svd_rows(["no totals here"], "cmd", "tiny") == []
