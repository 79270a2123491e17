"""Run every bench at one size and write one markdown table (with the command behind each figure).

    python bench/run_all.py [--size tiny|mid|full] [--rounds 3] [--out FILE]
                            [--only merge,flux_merge,hash,inspect,lora,lora_webui,tiled_vae,controlnet,svd,whole]

Each bench runs as its own process (``python bench/<name>_bench.py --size S --rounds R``; ``whole`` is
``bench/whole_commands.py``, the independent whole-command pairs of merge, hash and inspect), its full log streamed
here (and kept in ``FILE.log``); it hands back its table rows. Two benches take other flags, translated here:
``flux_merge`` takes ``--max-gb`` (tiny 0.25, mid 1.5, full 3 GB inputs) and ``svd`` (``lora_svd_bench.py``, full
against randomised SVD per SD1.5 layer shape) takes ``--min-rows`` (tiny: only the largest shapes) and prints its
totals, read back into one row. The table gives, per figure: ours and the baseline as median [min-max] over the
alternated rounds, the ratio as the median [min-max] of the per-round ratios (each round's two runs under the same
load), the equality check, the cache state, the load average at each round, the target from issue 17 where there is
one, and the command. Machine facts (cores, memory, load) are written at the start and at the end. ``tiny`` takes
a while on a loaded 2-core box and only shows that everything runs: its ratios are start-up dominated; ``mid`` and
``full`` are the figures to quote.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BENCHES = ("merge", "flux_merge", "hash", "inspect", "lora", "lora_webui", "tiled_vae", "controlnet", "svd", "whole")
#: the script of each bench (default: bench/<name>_bench.py)
SCRIPTS = {"svd": "lora_svd_bench.py", "whole": "whole_commands.py"}
FLUX_MAX_GB = {"tiny": "0.25", "mid": "1.5", "full": "3"}
SVD_MIN_ROWS = {"tiny": "2560", "mid": "1280", "full": "0"}
#: per bench and size, extra flags (kept short: the rest is each bench's own default for that size)
EXTRA = {("lora", "tiny"): ("--dtype", "fp32"), ("lora", "mid"): ("--dtype", "fp32"),
         ("lora", "full"): ("--dtype", "fp32")}


def bench_argv(name: str, size: str, rounds: int, rows_path: str) -> list:
    """The command line for one bench (most take --size/--rounds/--rows; two need their own flags)."""
    script = str(Path(__file__).resolve().parent / SCRIPTS.get(name, f"{name}_bench.py"))
    if name == "flux_merge":
        return [sys.executable, script, "--max-gb", FLUX_MAX_GB[size], "--rounds", str(rounds), "--rows", rows_path]
    if name == "svd":  # no rounds: each shape is timed both ways, the order alternating; no --rows (parsed below)
        return [sys.executable, script, "--rank", "32", "--threads", "2", "--min-rows", SVD_MIN_ROWS[size]]
    return [sys.executable, script, "--size", size, "--rounds", str(rounds), "--rows", rows_path]


def svd_rows(lines: list, shown: str, size: str) -> list:
    """lora_svd_bench prints its totals on one line; one table row from it."""
    import re

    for line in reversed(lines):
        m = re.search(r"full ([\d.]+) s, randomized ([\d.]+) s, speed-up ([\d.]+)x; largest error ratio ([\d.]+)",
                      line)
        if m:
            full, rand, speed, err = m.groups()
            return [C.Row(f"lora extract SVD {size}", "randomised vs full SVD, every SD1.5 layer shape x its count",
                          f"randomized: {rand} s", f"full SVD: {full} s", f"{float(rand) / float(full):.2f}x "
                          f"({speed}x faster)", f"largest error ratio {err} (1 = the full SVD's error)", "in RAM",
                          shown, loads=C.loadavg())]
    return []


def run_bench(name: str, size: str, rounds: int, log_fh, extra=()) -> tuple:
    with tempfile.NamedTemporaryFile(prefix=f"sdt-rows-{name}-", suffix=".json", delete=False) as tf:
        rows_path = tf.name
    argv = bench_argv(name, size, rounds, rows_path) + list(extra)
    shown_argv = [a for a in argv[1:] if a != rows_path]
    if "--rows" in shown_argv:
        shown_argv.remove("--rows")
    shown = "python " + " ".join(shlex.quote(a) for a in [f"bench/{Path(argv[1]).name}"] + shown_argv[1:])
    print(f"\n### {shown}", flush=True)
    log_fh.write(f"\n### {shown}\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=C.ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        log_fh.write(line)
        log_fh.flush()
        tail = (tail + [line.rstrip()])[-6:]
    rc = proc.wait()
    secs = time.perf_counter() - t0
    rows = []
    try:
        with open(rows_path) as fh:
            rows = [C.Row(**r) for r in json.load(fh)]
    except (OSError, ValueError):
        pass
    finally:
        try:
            os.unlink(rows_path)
        except OSError:
            pass
    if name == "svd" and rc == 0:
        rows = svd_rows(tail, shown, size)
    if rc != 0 or not rows:
        rows.append(C.Row(name, "FAILED" if rc else "no rows", "", "", "n/a",
                          f"exit {rc}: " + " / ".join(tail[-3:]), "", shown))
    return shown, rows, secs


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_table(path: Path, argv_shown: str, size: str, facts0: dict, facts1: dict, runs: list) -> str:
    out = [f"# SD Toolkit benchmarks, size `{size}`", "",
           f"Produced by `{argv_shown}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
           "(ratios: ours / baseline per alternated round, median [min-max]).", "",
           "| machine | at start | at end |", "|---|---|---|"]
    for k in facts0:
        out.append(f"| {k} | {md_escape(facts0[k])} | {md_escape(facts1.get(k, ''))} |")
    out += ["", "| bench | measure | ours | baseline | ratio | check | cache | load per round | target | command |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for shown, rows, secs in runs:
        for r in rows:
            out.append("| " + " | ".join(md_escape(x) for x in (r.bench, r.measure, r.ours, r.baseline, r.ratio,
                                                                  r.check, r.cache, r.loads, r.target,
                                                                  f"`{r.command}`" if r.command else "")) + " |")
    out += ["", "Bench commands (each took):"]
    for shown, rows, secs in runs:
        out.append(f"- `{shown}` ({secs:.0f} s)")
    text = "\n".join(out) + "\n"
    if path:
        path.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=C.SIZES, default="mid")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown file (default: bench/out/results-SIZE.md)")
    ap.add_argument("--extra", action="append", default=[], metavar="BENCH=ARGS",
                    help='more flags for one bench, e.g. --extra "merge=--skip-naive --no-warm" (repeatable)')
    args = ap.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    bad = [b for b in only if b not in BENCHES]
    if bad:
        ap.error(f"unknown bench {', '.join(bad)}; choose from {', '.join(BENCHES)}")
    if args.rounds < 3:
        print(f"note: {args.rounds} round(s): fewer than the 3 a published figure needs", flush=True)
    extra = dict(EXTRA)
    for e in args.extra:
        name, _, flags = e.partition("=")
        if name not in BENCHES:
            ap.error(f"--extra: unknown bench {name!r}")
        extra[(name, args.size)] = tuple(extra.get((name, args.size), ())) + tuple(shlex.split(flags))
    out = Path(args.out) if args.out else C.ROOT / "bench" / "out" / f"results-{args.size}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = "python bench/run_all.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    facts0 = C.machine_facts(C.ROOT)
    print(f"machine: {facts0}", flush=True)
    runs = []
    with open(str(out) + ".log", "w") as log_fh:
        for name in only:
            runs.append(run_bench(name, args.size, args.rounds, log_fh, extra.get((name, args.size), ())))
            write_table(out, shown.strip(), args.size, facts0, C.machine_facts(C.ROOT), runs)  # partial results
    text = write_table(out, shown.strip(), args.size, facts0, C.machine_facts(C.ROOT), runs)
    print("\n" + text, flush=True)
    print(f"written: {out} (log: {out}.log)", flush=True)
    failed = sum(1 for _, rows, _ in runs for r in rows if r.measure in ("FAILED", "no rows"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
