"""Fuzzing the server against its own OpenAPI document with schemathesis (its CLI, in a subprocess): valid and invalid
requests generated from the spec and sent over loopback to uvicorn. No response may be a 5xx, every status code, content
type and body must be one the spec declares, schema-invalid data must be refused with a 4xx, and afterwards the server
must still answer normally. (schemathesis's pytest plugin does not run under pytest 9, hence the CLI.)"""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

pytest.importorskip("schemathesis", reason="pip install -r requirements-dev.txt (schemathesis)")

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
EXAMPLES = 300  # per operation and phase


@pytest.fixture(scope="module")
def server():
    from test_serve import start_server

    srv = start_server("random", max_tokens=8)  # short default replies keep each example quick
    yield srv
    srv.__exit__(None, None, None)


def test_schemathesis_finds_no_server_error_and_no_spec_violation(server, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--checks", CHECKS,
         "--max-examples", str(EXAMPLES), "--seed", "0", "--generation-database", "none", "--workers", "2",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--no-color",
         "--suppress-health-check", "all", "--report", "junit", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its caches land in tmp, not the checkout
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]
    with httpx.Client(base_url=server.url) as h:  # whatever was thrown at it, it still serves
        assert h.get("/health").json()["ready"] is True
        r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        m = h.get("/metrics.json").json()
        assert m["requests_failed"] == 0 and m["invalid_requests"] > 0
