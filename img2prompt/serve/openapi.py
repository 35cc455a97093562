"""The server's OpenAPI document (/openapi.json, /docs) as the server behaves.

A generated client or a schema-based fuzzer finds no difference between the two:

- every answer a route can give is documented on that route (the bodies are read by hand, so FastAPI sees
  none of the 400/408/413/415/422/503 answers on its own), each a {"detail": "..."} object;
- the key schemes (X-API-Key, Authorization: Bearer) are declared only on a server started with a key, and
  401 is documented only there;
- the multipart `image` field is required and holds at least one file.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
ERROR_REF = {"$ref": "#/components/schemas/Error"}

REASONS = {
    400: "a malformed multipart body, or an image that cannot be decoded (named)",
    401: "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
    403: "a Host this server does not answer to, or a cross-origin POST",
    408: "the request body did not arrive in time",
    409: "the index failed to open (the previous one keeps serving), or a reload is already running",
    413: "the body, the images, the parts of the form or the queries in one request are over this server's limits",
    415: "not multipart/form-data (nor JSON, for /search)",
    422: "a field out of range or of the wrong type, an empty text, or no image in the form",
    503: "busy: the queue is full or the request did not finish in time; retry (Retry-After)",
}
# What each route can answer besides 200, from its handler and what it calls; every route passes the Host /
# Origin guard (403), and with a key, the key check (401).
UPLOAD_ERRORS = (400, 408, 413, 415, 422, 503)
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/health", "get"): (),
    ("/search", "post"): UPLOAD_ERRORS,
    ("/predict", "post"): UPLOAD_ERRORS,
    ("/interrogate", "post"): UPLOAD_ERRORS,
    ("/admin/reload", "post"): (409,),
}


def route_errors(path: str, method: str, keyed: bool) -> list[int]:
    """The error statuses `method path` can answer on a server with (keyed) or without an API key."""
    return sorted({403, *ROUTE_ERRORS[(path, method)], *((401,) if keyed else ())})


def describe(schema: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """FastAPI's generated document, completed in place (see the module's docstring)."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    if not keyed:
        schema["components"].pop("securitySchemes", None)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if not keyed:
                operation.pop("security", None)
            if (path, method) not in ROUTE_ERRORS:
                raise ValueError(f"{method.upper()} {path}: add its answers to serve/openapi.py's ROUTE_ERRORS")
            responses = operation.setdefault("responses", {})
            for status in route_errors(path, method, keyed):
                answer = {"description": REASONS[status], "content": {"application/json": {"schema": ERROR_REF}}}
                if status == 503:
                    answer["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                         "description": "seconds to wait before retrying"}}
                responses[str(status)] = answer
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form:
                form["schema"]["required"] = ["image"]
                form["schema"]["properties"]["image"]["minItems"] = 1
    return schema


def install_openapi(app: FastAPI, keyed: bool) -> None:
    """Serve `describe`'s document at /openapi.json (built once, on first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(get_openapi(title=app.title, version=app.version,
                                                      description=app.description, routes=app.routes), keyed)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def upload_body(fields: dict, json_schema: dict | None = None) -> dict:
    """OpenAPI for a body read by hand (so that /docs offers the upload form): multipart image(s) + fields."""
    image = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image file(s): "
             "PNG, JPEG or WebP"}
    content = {"multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                  "properties": {"image": image, **fields}}}}
    if json_schema:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}
