"""serve's own OpenAPI document drives a schema-based fuzzer (schemathesis) against the live ASGI app, keyed
and keyless: every answer must be one the document declares, with the body it declares (issue 30 item 15)."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (the dev extra) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

import img2prompt  # noqa: E402
from serve_fixtures import create_app  # noqa: E402

from schemathesis.specs.openapi.checks import positive_data_acceptance as ACCEPTANCE  # noqa: E402

EXAMPLES = 25  # per route and generation mode: bounded, derandomised
NO_INPUT = ("GET /health", "POST /admin/reload")
# Every other check runs (status codes, content types, response bodies, no 5xx, negative data refused).
# "Schema-valid data is accepted" cannot hold: a schema cannot say "a decodable image" (the fuzzer's bytes
# in `image` get the documented 400 naming the file), nor which model weights or k an index takes (422).


@pytest.fixture(scope="module")
def opened(built_index):
    with img2prompt.open_index(built_index, device="cpu") as index:
        yield index


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, "s3cret"])
def test_the_server_answers_as_its_document_says(opened, key):
    from schemathesis.python import asgi

    app = create_app(opened, api_key=key)  # no reopen: /admin/reload answers 409, as documented
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def fuzz(case) -> None:
                    case.call_and_validate(headers={"X-API-Key": key} if key else {}, excluded_checks=[ACCEPTANCE])

                try:
                    fuzz()
                except Unsatisfiable:  # a route without parameters or body has no negative input
                    assert mode == schemathesis.GenerationMode.NEGATIVE and operation.label in NO_INPUT
            checked.append(operation.label)
    finally:
        asgi.shutdown_lifespans()  # the model worker of this app
    assert len(checked) == 5
