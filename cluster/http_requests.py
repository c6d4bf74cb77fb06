"""HTTP request parsing for the serving API (cluster/serve.py): bodies, media types, status codes.

The model-side checks (is it a PNG/JPEG, its declared pixel count) stay in
`resnet_dist.inference.decode_image`, which knows nothing of HTTP: it raises
`InputError`, answered with 400. Everything here is about the request around the
image -- its Content-Type, its size, multipart and JSON framing -- and raises
`RequestError`, which carries the status code to answer with. Neither reaches the model.

(Not named `http.py`: a module of that name would shadow the standard library's `http`
for anything that ever runs with cluster/ on its path.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import hmac
import json
from http import HTTPStatus
from typing import Any, Awaitable

from starlette.requests import Request

SINGLE_IMAGE_TYPES = ("application/octet-stream", "image/png", "image/jpeg", "multipart/form-data")
BATCH_TYPE = "application/json"


class RequestError(ValueError):
    """A request refused before it reaches the model; `status` is the HTTP status code to answer with."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.headers = dict(headers or {})


def authorize(request: Request, api_key: str | None) -> None:
    """RequestError 401 unless the request carries `api_key` (`Authorization: Bearer <key>` or
    `X-API-Key: <key>`); nothing is checked when no key is configured."""
    if not api_key:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    # Constant time, so the comparison does not leak how much of a guess was right.
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise RequestError("missing or wrong API key (send Authorization: Bearer <key>)", HTTPStatus.UNAUTHORIZED,
                           {"WWW-Authenticate": "Bearer"})


def media_type(content_type: str | None) -> str:
    """`image/png; charset=x` -> `image/png` (lower case; '' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def require_media_type(content_type: str | None, allowed: tuple[str, ...]) -> str:
    """The request's media type if it is one of `allowed`, else RequestError 415."""
    kind = media_type(content_type)
    if kind not in allowed:
        use = allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)
        raise RequestError(f"unsupported content type {kind or '(none)'!r}; use {use}", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    return kind


async def within(seconds: float, work: Awaitable[Any]) -> Any:
    """`work`'s result, or RequestError 408 once it has run `seconds`.

    The replica's own deadline: Serve's `request_timeout_s` is one value for the whole cluster
    (the first `serve.start` sets it), and any client can lift it for its request with the header
    `x-request-timeout-seconds: 0` (ray/serve/_private/http_util.py `parse_request_timeout_header`),
    so a request could otherwise wait in the batcher as long as its client likes."""
    if not hasattr(asyncio, "timeout"):   # Python 3.10: wait_for, a task per request
        try:
            return await asyncio.wait_for(work, seconds)
        except asyncio.TimeoutError:
            raise RequestError(f"request timed out after {seconds:g} s", HTTPStatus.REQUEST_TIMEOUT) from None
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await work
    except TimeoutError:
        if not deadline.expired():   # a TimeoutError of the work's own, not the deadline
            raise
        raise RequestError(f"request timed out after {seconds:g} s", HTTPStatus.REQUEST_TIMEOUT) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it exceeds `limit` bytes (declared or actual)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("invalid Content-Length header")
        if int(declared) > limit:
            raise RequestError(f"body of {declared} bytes exceeds the limit of {limit} bytes",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    # Counted while reading too: a chunked body declares no length.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body exceeds the limit of {limit} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
    if not size:
        raise RequestError("empty body")
    return b"".join(chunks)


def multipart_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The bytes of form field `field` in a multipart/form-data body; RequestError (400) if absent."""
    # The stdlib MIME parser reads multipart/form-data once it is given the header with the boundary.
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart() or msg.defects:
        raise RequestError("malformed multipart/form-data body")
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == field:
            return part.get_payload(decode=True) or b""
    raise RequestError(f"multipart/form-data body has no field {field!r}")


def decode_batch_json(body: bytes, max_images: int) -> list[bytes]:
    """`{"images": [base64, ...]}` -> raw image bytes; 400 if malformed, 413 if over `max_images`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("malformed JSON body") from None
    except RecursionError:   # [[[[...]]]] nested past Python's recursion limit: not an image list
        raise RequestError("malformed JSON body (nested too deeply)") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise RequestError('body must be {"images": [base64 strings]}')
    if not images:
        raise RequestError("no images given")
    if len(images) > max_images:
        raise RequestError(f"too many images: {len(images)} > {max_images}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    out = []
    for i, s in enumerate(images):
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(f"images[{i}]: malformed base64") from None
    return out
