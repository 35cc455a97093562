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


ROUTES = [("/health", "get"), ("/search", "post"), ("/predict", "post"), ("/interrogate", "post"),
          ("/admin/reload", "post")]


def _schema(**options) -> dict:
    return TestClient(serve.create_app(_StubIndex(), allowed_hosts=("testserver",), **options)).get(
        "/openapi.json").json()


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_the_document_declares_key_schemes_only_on_a_keyed_server(key):
    schema = _schema(api_key=key)
    operations = [schema["paths"][path][method] for path, method in ROUTES]
    assert sorted((path, method) for path in schema["paths"] for method in schema["paths"][path]) == sorted(ROUTES)
    if key is None:
        assert "securitySchemes" not in schema["components"]
        assert all("security" not in operation and "401" not in operation["responses"] for operation in operations)
    else:
        assert set(schema["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
        assert all(operation["security"] and "401" in operation["responses"] for operation in operations)


@pytest.mark.parametrize("path", ["/search", "/predict", "/interrogate"])
def test_the_image_field_is_required(path):
    body = _schema()["paths"][path]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert body["required"] is True and schema["required"] == ["image"] and schema["properties"]["image"]["minItems"] == 1


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _answers(client: TestClient, key: str | None) -> dict[tuple[str, str], set[int]]:
    """Requests that draw each error a route can answer (each status observed, not assumed)."""
    good = {"X-API-Key": key} if key else {}
    seen: dict[tuple[str, str], set[int]] = {route: set() for route in ROUTES}

    def call(path: str, method: str, headers: dict | None = None, **request) -> None:
        answer = client.request(method, path, headers={**good, **(headers or {})}, **request)
        seen[(path, method)].add(answer.status_code)

    for path, method in ROUTES:
        call(path, method, headers={"Host": "evil.example"})  # 403
        if key:
            call(path, method, headers={"X-API-Key": "wrong"})  # 401
    for path in ("/search", "/predict", "/interrogate"):
        call(path, "post", content=b"x", headers={"Content-Type": "text/plain"})  # 415
        call(path, "post", content=b"x", headers={"Content-Type": "multipart/form-data"})  # 400: no boundary
        call(path, "post", files=[("image", ("a.png", b"not an image", "image/png"))])  # 400
        call(path, "post", files=[("other", ("a.png", _png(), "image/png"))])  # 422
        call(path, "post", files=[("image", ("a.png", _png(), "image/png"))] * 40)  # 413: max_batch
    call("/search", "post", json={"text": "", "k": 1})  # 422
    call("/admin/reload", "post")  # 409: no way to re-open
    return seen


@pytest.mark.parametrize("key", [None, "s3cret"])
def test_every_answer_a_route_gives_is_documented(key):
    app = serve.create_app(_StubIndex(), allowed_hosts=("testserver",), api_key=key,
                           limits=serve.ServeLimits(max_batch=4))
    with TestClient(app) as client:
        schema = client.get("/openapi.json", headers={"X-API-Key": key} if key else {}).json()
        seen = _answers(client, key)
    for (path, method), statuses in seen.items():
        documented = set(map(int, schema["paths"][path][method]["responses"]))
        assert statuses <= documented, f"{method.upper()} {path} answered {sorted(statuses - documented)}"
    # and the errors documented are ones the server gives (408, 503 need a slow client or a full queue)
    for path, method in ROUTES:
        documented = set(map(int, schema["paths"][path][method]["responses"])) - {200, 408, 503}
        assert documented <= seen[(path, method)] | {200}, (path, documented - seen[(path, method)])


def test_a_form_field_sent_twice_is_refused_not_guessed():
    """The document says k is one integer; a form with two (what the fuzzer sent) got 200 on the last one."""
    with TestClient(serve.create_app(_StubIndex(), allowed_hosts=("testserver",))) as client:
        answer = client.post("/search", files=[("image", ("a.png", _png(), "image/png"))],
                             data={"k": ["3", "4"]})
    assert answer.status_code == 422 and "'k' is given twice" in answer.json()["detail"]
