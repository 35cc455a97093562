"""The OpenAPI schema documents every field the endpoints read (min_score included), for /docs and clients."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

from img2prompt import serve  # noqa: E402


class _StubIndex:
    """Only what create_app reads: the schema needs no model or index files."""
    count = 100


def _fields(schema: dict, path: str, content: str) -> dict:
    body = schema["paths"][path]["post"]["requestBody"]["content"][content]["schema"]
    return body.get("properties", {})


def test_openapi_documents_min_score_for_search_and_predict():
    app = serve.create_app(_StubIndex(), allowed_hosts=("testserver",))
    schema = TestClient(app).get("/openapi.json").json()
    assert "min_score" in _fields(schema, "/search", "multipart/form-data")
    assert "min_score" in _fields(schema, "/search", "application/json")
    assert "min_score" in _fields(schema, "/predict", "multipart/form-data")
    assert _fields(schema, "/predict", "multipart/form-data")["min_score"]["type"] == "number"
