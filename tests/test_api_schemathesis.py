"""A bounded schemathesis run against the standalone app's ``/openapi.json`` (issue 11): every operation gets a small,
fixed, derandomized budget of generated requests (valid and invalid), sent through the ASGI app (no network), with
a private copy of the sample library as the host. No answer may be a 5xx (schemathesis' ``not_a_server_error``)."""
from __future__ import annotations

import collections
import logging
import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")  # requirements-test.txt pins it

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from lib_sdtoolkit.host import StandaloneHost  # noqa: E402
from lib_sdtoolkit.server.app import create_app  # noqa: E402

#: generated requests per operation (about 20 operations): the whole run stays well under a minute on 2 busy cores
EXAMPLES = 6


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("schemathesis") / "models"
    shutil.copytree(models_dir, root)  # a copy: generated dedup/prune/merge requests may act on it
    cache = root.parent / "hashes.sqlite"
    host = StandaloneHost(models_dir=root, settings={"sdtoolkit_hash_cache": str(cache)},
                          progress_sink=lambda *a: None)
    return create_app(host, ui=False)


def test_openapi_fuzz_finds_no_server_error(app, caplog):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts: dict = collections.defaultdict(collections.Counter)
    failures: list = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 15  # every feature's routes are in the schema

    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case):
            try:
                resp = case.call(timeout=300)  # schemathesis' own 10 s read timeout fails a dedup on a busy box
            except Exception as exc:  # the ASGI transport re-raises what the app did not handle
                counts[op.label]["exception"] += 1
                failures.append((op.label, repr(exc)[:200], str(case.body)[:200]))
                return
            counts[op.label][f"{resp.status_code // 100}xx"] += 1
            try:
                case.validate_response(resp, checks=[not_a_server_error])
            except Exception:  # noqa: BLE001 - collected, reported together below
                failures.append((op.label, f"{resp.status_code} {resp.text[:200]}", str(case.body)[:200]))

        with caplog.at_level(logging.CRITICAL):
            run()

    total = sum(sum(c.values()) for c in counts.values())
    assert total >= EXAMPLES * 10  # the run really sent requests
    assert not failures, "\n".join(map(str, failures[:20]))
