#!/usr/bin/env bash
# Install what SD Toolkit needs, skipping whatever is already installed (so a second run takes seconds).
#   bash setup.sh          the app and the command line
#   bash setup.sh --test   plus the test tools (pytest, Playwright + Debian's Chromium, webuiapi, lycoris-lora, ...)
# torch is pinned to 2.13.0, the CPU build pip finds locally on our machines; install your own CUDA build first
# if you want the GPU (any torch >= 2.1 works; this script then leaves it alone).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
reqs=requirements.txt
[ "${1:-}" = "--test" ] && reqs=requirements-test.txt

missing=$("$PY" - "$reqs" <<'PYEOF'
import sys, re
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
def lines(path):
    for raw in open(path):
        s = raw.split("#", 1)[0].strip()
        if not s:
            continue
        if s.startswith("-r "):
            yield from lines(s[3:].strip())
        else:
            yield s
out = []
for s in lines(sys.argv[1]):
    r = Requirement(s)
    try:
        have = metadata.version(r.name)
    except metadata.PackageNotFoundError:
        out.append(s); continue
    if r.name == "torch" and r.specifier.contains("2.13.0") and have:
        # any installed torch >= 2.1 is fine (a user's CUDA build must not be replaced)
        major, minor = (int(x) for x in re.findall(r"\d+", have)[:2])
        if (major, minor) >= (2, 1):
            continue
    if r.specifier and not r.specifier.contains(have, prereleases=True):
        out.append(s)
print("\n".join(out))
PYEOF
)
if [ -n "$missing" ]; then
  echo "setup: installing: $(echo "$missing" | tr '\n' ' ')"
  # shellcheck disable=SC2086
  echo "$missing" | xargs -d '\n' "$PY" -m pip install --disable-pip-version-check -q
else
  echo "setup: python packages already installed"
fi
# Packages whose own pins are ancient (the original ldm the WebUI runs; sd-mecha): never let pip resolve them.
nodeps=$("$PY" - <<'PYEOF'
from importlib import metadata
for raw in open("requirements-nodeps.txt"):
    s = raw.split("#", 1)[0].strip()
    if not s:
        continue
    name, _, version = s.partition("==")
    try:
        if metadata.version(name) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(s)
PYEOF
)
if [ -n "$nodeps" ]; then
  echo "$nodeps" | xargs -d '\n' "$PY" -m pip install --disable-pip-version-check -q --no-deps
fi
if [ "$reqs" = requirements-test.txt ] && ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium for the browser test"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; else
    sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
