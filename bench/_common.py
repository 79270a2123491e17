"""What every bench shares: alternated rounds, whole-command timing, page-cache control and residency, the summary.

Kept free of torch (and of ``lib_sdtoolkit``) on purpose: the drivers import only this, so a child's peak RSS read
from ``/usr/bin/time`` (or ``wait4``) is the child's own, and a driver's start-up costs nothing measurable.

The rules the benches follow (issue 18):
* equal work on both sides: same inputs, outputs checked equal (the bench prints the max abs difference), same
  durability (an fsync on every side or on none);
* the cache state is stated: ``evict`` fsyncs each of the bench's own files and drops it from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)``; ``residency`` says (through ``mincore``) how much of it was resident
  just before a run started;
* sides alternate over rounds (the order rotates each round), and the summary gives median / min / max of each
  side and the ratio *per round*, with the load average at each round.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SIZES = ("tiny", "mid", "full")


# ----------------------------------------------------------------------------------------------- machine facts
def loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def meminfo_mb(field_name: str) -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_facts(where: Optional[Path] = None) -> Dict[str, str]:
    flags = cpu_flags()
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    facts = {
        "cpu": f"{cpu_model()} ({cores} logical cores, {usable} usable; sha_ni {'yes' if 'sha_ni' in flags else 'no'}, "
               f"avx2 {'yes' if 'avx2' in flags else 'no'})",
        "memory": f"{meminfo_mb('MemTotal') / 1024:.1f} GiB total, {meminfo_mb('MemAvailable') / 1024:.1f} GiB available",
        "load average (1/5/15 min)": loadavg(),
        "python": platform.python_version(),
    }
    if where is not None:
        du = shutil.disk_usage(where)
        facts["disk"] = f"{du.free / 2**30:.0f} GiB free at {where}"
    return facts


def mem_available_mb() -> float:
    return meminfo_mb("MemAvailable")


# ----------------------------------------------------------------------------------------------- page cache
def evict(paths: Iterable[os.PathLike]) -> None:
    """Write back and drop each file from the page cache (our own files only; no global drop_caches)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Iterable[os.PathLike], chunk: int = 16 << 20) -> None:
    """Read each file once so that it is in the page cache."""
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def _resident_pages(path: os.PathLike):
    """(resident pages, total pages) of one file, through mincore on a PROT_READ mapping (no page is touched)."""
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    total = (size + page - 1) // page
    if size == 0:
        return 0, 0
    libc = _get_libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed", str(path))
        try:
            vec = (ctypes.c_ubyte * total)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", str(path))
            resident = sum(1 for b in vec if b & 1)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return resident, total


def residency(paths: Iterable[os.PathLike]) -> float:
    """Fraction (0..1) of the files' pages in the page cache; NaN where it cannot be told.

    mincore through ctypes; ``fincore`` (util-linux) as the fallback."""
    res = tot = 0
    for p in paths:
        if not os.path.exists(p):
            continue
        try:
            r, t = _resident_pages(p)
        except (OSError, AttributeError):
            r, t = _fincore(p)
        res, tot = res + r, tot + t
    return res / tot if tot else float("nan")


def _fincore(path) -> tuple:
    exe = shutil.which("fincore")
    if not exe:
        return 0, 0
    out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", str(path)],
                         capture_output=True, text=True)
    try:
        res, size = (int(x) for x in out.stdout.split()[:2])
    except ValueError:
        return 0, 0
    page = mmap.PAGESIZE
    return res // page, (size + page - 1) // page


def fmt_res(x: float) -> str:
    return "?" if x != x else f"{100 * x:.0f}%"


# ----------------------------------------------------------------------------------------------- commands
TIME_BIN = shutil.which("time") if os.path.exists("/usr/bin/time") else None
if os.path.exists("/usr/bin/time"):
    TIME_BIN = "/usr/bin/time"


class CommandFailed(RuntimeError):
    pass


def run_command(argv: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[os.PathLike] = None,
                shell: bool = False, timeout: Optional[float] = None) -> Dict[str, object]:
    """Run a whole command; return its wall seconds (this process's clock around the child: start-up included),
    its peak RSS in MB (GNU time's %M: the child's own, not polluted by this process), its CPU seconds (GNU time's
    %U user and %S system: the child's and its children's), the machine's CPU seconds over the run by state
    (:func:`machine_cpu`: where the cores were idle, waiting for the disk or taken by the hypervisor) and its
    stdout."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.NamedTemporaryFile(prefix="sdt-bench-time-", suffix=".txt", delete=False) as tf:
        tpath = tf.name
    cmd: List[str]
    if shell:
        cmd = ["/bin/sh", "-c", argv if isinstance(argv, str) else " ".join(shlex.quote(a) for a in argv)]
    else:
        cmd = [str(a) for a in argv]
    if TIME_BIN:
        cmd = [TIME_BIN, "-f", "%M %U %S", "-o", tpath] + cmd
    m0 = machine_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    m1 = machine_cpu()
    rss = user = system = float("nan")
    try:
        with open(tpath) as fh:
            last = fh.read().strip().splitlines()[-1:]  # GNU time puts "Command exited with ..." before it
        fields = last[0].split() if last else []
        if len(fields) == 3:
            rss, user, system = int(fields[0]) / 1024, float(fields[1]), float(fields[2])
    except (OSError, ValueError):
        pass
    finally:
        try:
            os.unlink(tpath)
        except OSError:
            pass
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise CommandFailed(f"{cmd_str(argv)} exited {proc.returncode}: " + " | ".join(tail))
    machine = {k: m1[k] - m0[k] for k in m0} if m0 and m1 else {}
    return {"wall": wall, "rss_mb": rss, "cpu_user": user, "cpu_sys": system, "machine": machine,
            "stdout": proc.stdout, "stderr": proc.stderr}


def cpu_fields(r: Dict[str, object]) -> Dict[str, float]:
    """From :func:`run_command`'s result: ``cpu_s`` (the command's user + system CPU seconds) and the machine's
    ``m_busy`` / ``m_wait`` (idle + iowait) / ``m_steal`` CPU seconds over the run, summed over the cores."""
    out: Dict[str, float] = {"cpu_s": float(r.get("cpu_user", float("nan"))) + float(r.get("cpu_sys", float("nan")))}
    m = r.get("machine") or {}
    if m:  # a kernel that lists fewer states (no steal before Linux 2.6.11) counts them as 0
        out["m_busy"] = sum(m.get(k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
        out["m_wait"] = m.get("idle", 0.0) + m.get("iowait", 0.0)
        out["m_steal"] = m.get("steal", 0.0)
    return out


_CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> Dict[str, float]:
    """CPU seconds the whole machine has spent in each state since boot, summed over its cores (Linux
    ``/proc/stat``; empty elsewhere). Differences over a run say whether the cores were busy (user, system), idle,
    waiting for the disk (iowait) or taken by the hypervisor for other guests (steal)."""
    try:
        with open("/proc/stat") as fh:
            first = fh.readline().split()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return {}
    if not first or first[0] != "cpu":
        return {}
    return {k: int(v) / hz for k, v in zip(_CPU_STATES, first[1:])}


def merge_stats(stderr: str) -> Dict[str, float]:
    """The merge's own split of its time (``SDTOOLKIT_MERGE_STATS=1``: one ``sdtoolkit-merge-stats {json}`` line on
    stderr), as ``split_<stage>`` seconds: ``pipeline`` (reading, computing and writing, overlapped), ``read_<i>``
    (input i's reader busy), ``compute`` (summed over the compute threads), ``write`` (the writer busy),
    ``fsync_rename`` (the final fsync), ``setup`` (opening, planning, hashes)."""
    for line in reversed((stderr or "").splitlines()):
        if line.startswith("sdtoolkit-merge-stats "):
            try:
                j = json.loads(line.split(" ", 1)[1])
            except ValueError:
                return {}
            keep = ("setup", "pipeline", "read_0", "read_1", "read_2", "compute", "write", "fsync_rename")
            return {f"split_{k}": float(j[k]) for k in keep if k in j}
    return {}


def cmd_str(argv) -> str:
    if isinstance(argv, str):
        return argv
    return " ".join(shlex.quote(str(a)) for a in argv)


def last_json(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object (children print one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON line in the output:\n" + text[-2000:])


def child_peak_rss_mb() -> float:
    """For a child's own report: its peak RSS (VmHWM, per address space, reset by exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def status_mb(name: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- rounds
@dataclass
class Side:
    """One contender. ``fn()`` does the work once and returns a dict of measures (at least the ``metric`` the
    bench ranks by, e.g. ``"seconds"``); ``before()`` runs untimed first (evict / warm / delete the output);
    ``files`` are the inputs whose page-cache residency is recorded just before ``fn`` starts."""

    name: str
    fn: Callable[[], Dict[str, float]]
    before: Optional[Callable[[], None]] = None
    after: Optional[Callable[[Dict[str, float]], None]] = None
    files: Sequence[os.PathLike] = ()
    command: str = ""
    cache: str = ""


@dataclass
class Rounds:
    sides: List[Side]
    results: Dict[str, List[Dict[str, float]]] = field(default_factory=dict)
    loads: List[float] = field(default_factory=list)

    def values(self, side: str, metric: str) -> List[float]:
        return [r.get(metric, float("nan")) for r in self.results.get(side, [])]

    def to_json(self) -> dict:
        """For a child that ran the rounds itself: names, commands and results (no callables)."""
        return {"sides": [{"name": s.name, "command": s.command, "cache": s.cache} for s in self.sides],
                "results": self.results, "loads": self.loads}

    @classmethod
    def from_json(cls, j: dict) -> "Rounds":
        sides = [Side(s["name"], lambda: {}, command=s.get("command", ""), cache=s.get("cache", ""))
                 for s in j["sides"]]
        return cls(sides, j["results"], j["loads"])


def alternate(sides: List[Side], rounds: int, log: Callable[[str], None] = print) -> Rounds:
    """Run every side once per round, the order rotating each round (A B C, B C A, C A B, ...), so that a trend in
    the machine's load falls on every side alike. Records the 1-min load average at the start of each round and,
    per run, the residency of the side's files just before it started (``residency``) and the load (``load1``)."""
    out = Rounds(sides, {s.name: [] for s in sides})
    n = len(sides)
    for r in range(rounds):
        out.loads.append(load1())
        order = sides[r % n:] + sides[:r % n]
        for s in order:
            if s.before:
                s.before()
            res_before = residency(s.files) if s.files else float("nan")
            l1 = load1()
            m = dict(s.fn())
            m.setdefault("residency", res_before)
            m["load1"] = l1
            if s.after:
                s.after(m)
            out.results[s.name].append(m)
            log(f"  round {r + 1}/{rounds} {s.name:<34} " + " ".join(
                f"{k}={_fmt_num(v)}" for k, v in m.items() if isinstance(v, (int, float))))
    return out


def _fmt_num(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def med_min_max(xs: Sequence[float]) -> tuple:
    xs = [x for x in xs if x == x]
    if not xs:
        return (float("nan"),) * 3
    return statistics.median(xs), min(xs), max(xs)


def fmt_mmm(xs: Sequence[float], unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
    """``median unit [min-max]``."""
    m, lo, hi = med_min_max([x * scale for x in xs])
    if m != m:
        return "n/a"
    u = f" {unit}" if unit else ""
    return f"{m:.{digits}f}{u} [{lo:.{digits}f}-{hi:.{digits}f}]"


def ratios(rounds: Rounds, a: str, b: str, metric: str) -> List[float]:
    """Per-round ratio a/b of ``metric`` (same round, so the same load)."""
    out = []
    for x, y in zip(rounds.values(a, metric), rounds.values(b, metric)):
        out.append(x / y if y and y == y and x == x else float("nan"))
    return out


def fmt_ratio(rs: Sequence[float]) -> str:
    m, lo, hi = med_min_max(rs)
    if m != m:
        return "n/a"
    return f"{m:.2f}x [{lo:.2f}-{hi:.2f}]"


def print_summary(rounds: Rounds, metric: str, unit: str = "s", scale: float = 1.0, title: str = "",
                  ref: Optional[str] = None, log: Callable[[str], None] = print, digits: int = 2) -> None:
    """Median/min/max per side; per-round ratio of every side to ``ref``; the load at each round."""
    if title:
        log(f"{title}  (load average at each round: {', '.join(f'{x:.2f}' for x in rounds.loads)})")
    for s in rounds.sides:
        vals = rounds.values(s.name, metric)
        res = [r.get("residency", float("nan")) for r in rounds.results[s.name]]
        line = f"  {s.name:<34} {metric}: {fmt_mmm(vals, unit, scale, digits)}"
        if any(x == x for x in res):
            line += f"  residency before: {', '.join(fmt_res(x) for x in res)}"
        log(line)
    if ref:
        for s in rounds.sides:
            if s.name == ref:
                continue
            rs = ratios(rounds, s.name, ref, metric)
            log(f"  ratio {s.name} / {ref}: per round {', '.join(f'{x:.2f}' for x in rs)} -> {fmt_ratio(rs)}")


# ----------------------------------------------------------------------------------------------- table rows
@dataclass
class Row:
    bench: str
    measure: str
    ours: str
    baseline: str
    ratio: str
    check: str
    cache: str
    command: str
    target: str = ""
    loads: str = ""

    def as_dict(self) -> Dict[str, str]:
        return dict(self.__dict__)


def row_for(rounds: Rounds, bench: str, measure: str, ours: str, base: str, metric: str, check: str,
            cache: str, command: str, unit: str = "s", scale: float = 1.0, target: str = "",
            digits: int = 2) -> Row:
    rs = ratios(rounds, ours, base, metric)
    return Row(bench, measure,
               f"{ours}: {fmt_mmm(rounds.values(ours, metric), unit, scale, digits)}",
               f"{base}: {fmt_mmm(rounds.values(base, metric), unit, scale, digits)}",
               fmt_ratio(rs), check, cache, command, target, ", ".join(f"{x:.1f}" for x in rounds.loads))


def target_text(ratio_median: float, limit: float, better: str = "<=") -> str:
    if ratio_median != ratio_median:
        return f"target {better} {limit}x: not measured"
    ok = ratio_median <= limit if better == "<=" else ratio_median >= limit
    return f"target {better} {limit}x: {'met' if ok else f'missed ({ratio_median / limit:.2f}x the target)'}"


def emit_rows(rows: List[Row], path: Optional[str]) -> None:
    """Children hand their table rows to run_all through a JSON file (``--rows FILE``)."""
    if path:
        with open(path, "w") as fh:
            json.dump([r.as_dict() for r in rows], fh)


def size_arg(ap) -> None:
    ap.add_argument("--size", choices=SIZES, default="mid", help="tiny (seconds), mid, full (the published figures)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (>= 3 for published figures)")
    ap.add_argument("--rows", help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def bench_dir(default_sub: str) -> Path:
    """Where the bench's big files go: $SDTOOLKIT_BENCH_DIR or bench/<default_sub> (git-ignored)."""
    base = os.environ.get("SDTOOLKIT_BENCH_DIR")
    d = Path(base) / default_sub if base else ROOT / "bench" / default_sub
    d.mkdir(parents=True, exist_ok=True)
    return d


def torch_free_env() -> Dict[str, str]:
    """Environment for the children: the repo on PYTHONPATH, a throwaway hash cache so that no run is answered
    from a cache that an earlier run filled."""
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env


def bytecode_env(env: Dict[str, str], where: os.PathLike) -> Dict[str, str]:
    """Let the children load our modules from compiled bytecode, as an installed copy does (pip, and the WebUI's
    own Python, write ``.pyc`` files; torch's are installed): with ``PYTHONDONTWRITEBYTECODE`` set, as on these
    machines, every whole command compiled every module of ``lib_sdtoolkit`` from source at start-up (about a
    second of CPU under load), which no user pays. The bytecode goes to ``where`` (``PYTHONPYCACHEPREFIX``, so the
    repo is not touched; delete it with the bench's other files) and is written once here, untimed."""
    env = dict(env)
    env["PYTHONDONTWRITEBYTECODE"] = ""  # empty = unset for Python
    env["PYTHONPYCACHEPREFIX"] = str(where)
    full = dict(os.environ)
    full.update(env)
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "lib_sdtoolkit")], env=full, cwd=str(ROOT),
                   capture_output=True, check=True)
    return env
