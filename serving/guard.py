"""ASGI middleware in front of the upload routes: every client mistake becomes one JSON 4xx before BentoML sees it.

BentoML's own form handling turns several bad requests into 500s (long or empty filenames, a text `image`
field that it would fetch as a URL, malformed multipart, thousands of fields) and reads a whole body before
refusing its size. This guard reads the body itself, bounded in bytes and time, checks every field, and
hands BentoML a canonical multipart body with exactly the declared fields, each once:

    POST /predict  multipart/form-data: image=<file>, gender=<0-1>, race=<0-4>
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import signal
from dataclasses import dataclass

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse

from serving.image import MAX_UPLOAD_BYTES, InputError, check_header

log = logging.getLogger("bentoml.agegroup")

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart headers and the small fields, on top of the image
BODY_TIMEOUT_S = float(os.environ.get("AGEGROUP_BODY_TIMEOUT_S", 10))  # a slower upload is dropped (408)
SHUTDOWN_POLL_S = 0.5  # how often a stalled upload checks whether the server is shutting down
# Boundaries of the re-encoded bodies: a per-process secret and a counter (no random draw per request).
_SECRET = secrets.token_hex(12)
BOUNDARIES = (f"agegroup{_SECRET}{n:x}" for n in itertools.count())


@dataclass(frozen=True)
class Route:
    """An upload route: its file field, its integer fields with their (lowest, highest) values, and optional
    true/false fields."""

    file_field: str
    int_fields: dict[str, tuple[int, int]]
    optional_bools: tuple[str, ...] = ()

    @property
    def fields(self) -> set[str]:
        return {self.file_field, *self.int_fields, *self.optional_bools}

    @property
    def required(self) -> set[str]:
        return {self.file_field, *self.int_fields}


# Before a 413 is sent while the body still arrives, up to this much more of it is read and dropped.
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 2 * (MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES)
BOOLEANS = {"true": "true", "1": "true", "false": "false", "0": "false"}  # accepted spellings -> canonical


class RequestError(Exception):
    """A client mistake: HTTP status and a message that is safe to show; `unread` when the client may still be
    sending its body."""

    def __init__(self, status: int, message: str, unread: bool = False):
        super().__init__(message)
        self.status, self.message, self.unread = status, message, unread


def error_response(status: int, message: str) -> JSONResponse:
    """The API's one error shape, {"error": "..."}, used by the guard and the service alike."""
    return JSONResponse({"error": message}, status_code=status)


class UploadGuard:
    """Pure ASGI middleware; `routes` maps a path to its Route. Other paths pass through untouched."""

    def __init__(self, app, routes: dict[str, Route], max_body: int = MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES,
                 body_timeout: float = BODY_TIMEOUT_S):
        self.app, self.routes, self.max_body, self.body_timeout = app, routes, max_body, body_timeout

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            message = f"{scope['path']} takes POST (multipart/form-data), not {scope['method']}"
            log.info("%s %s refused with 405: %s", scope["method"], scope["path"], message)
            return await respond(scope, receive, send, 405, message, {"allow": "POST"})
        try:
            fields = await self.checked_fields(scope, receive, route)
        except RequestError as exc:
            log.info("%s %s refused with %d: %s", scope["method"], scope["path"], exc.status, exc.message)
            if exc.unread:
                # Read and drop what the client is still sending (bounded) before answering: closing a socket
                # with unread data resets the connection, and the reset can discard the answer on its way.
                await drain(receive)
            return await respond(scope, receive, send, exc.status, exc.message)
        except ClientGone as exc:
            log.info("%s %s abandoned by the client: %s", scope["method"], scope["path"], exc)
            # Nobody reads this answer (uvicorn drops it), but it must be sent: BentoML's TimeoutMiddleware
            # waits for a first send, up to its 60 s traffic timeout, and shutdown waits for that request.
            return await respond(scope, receive, send, 400, f"the client went away: {exc}")
        boundary = next(BOUNDARIES)
        payload, sent = encode_form(fields, route.file_field, boundary), False
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                    (b"content-length", str(len(payload)).encode())]

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a real receive does

        await self.app({**scope, "headers": headers}, replay, send)

    async def checked_fields(self, scope, receive, route: Route) -> dict[str, bytes | int]:
        """Read, parse and check the request: the file's bytes and the integer values, by field name."""
        headers = Headers(scope=scope)
        kind = headers.get("content-type", "")
        if not kind.lower().startswith("multipart/form-data") or "boundary=" not in kind:
            raise RequestError(415, f"send multipart/form-data with the fields {', '.join(sorted(route.fields))} "
                                    f"(`{route.file_field}` an uploaded file); got Content-Type {kind or 'none'!r}")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, f"Content-Length must be a number of bytes; got {declared!r}")
            if int(declared) > self.max_body:
                raise RequestError(413, too_large(int(declared)), unread=True)
        raw = await self.read_body(receive)
        return await parse_form(headers, raw, route)

    async def read_body(self, receive) -> bytes:
        """The whole body, refused past max_body bytes (413), past body_timeout seconds (408), or once the
        server has begun to shut down (503), so that a stalled upload never holds a shutdown up."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        try:
            while True:
                message = None
                while message is None:  # wait in slices, to notice a shutdown (cancelling receive() is safe)
                    try:
                        async with asyncio.timeout_at(min(deadline, loop.time() + SHUTDOWN_POLL_S)):
                            message = await receive()
                    except TimeoutError:
                        if loop.time() >= deadline:
                            raise
                        if server_stopping():
                            raise RequestError(503, "the server is shutting down; send the request again") from None
                if message["type"] == "http.disconnect":
                    raise ClientGone(f"disconnected after {size} bytes of the body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise RequestError(413, too_large(size, at_least=True), unread=message.get("more_body", False))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.body_timeout:g} s") from None


def server_stopping() -> bool:
    """uvicorn (under BentoML) has been told to exit: its SIGTERM handler is a running Server's handle_exit, and
    that server's should_exit is set."""
    handler = signal.getsignal(signal.SIGTERM)
    return bool(getattr(getattr(handler, "__self__", None), "should_exit", False))


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


def encode_form(fields: dict[str, bytes | int], file_field: str, boundary: str) -> bytes:
    """The checked fields as a canonical multipart body: a fixed file name, no client content type."""
    parts = []
    for name, value in fields.items():
        if name == file_field:
            head = f'Content-Disposition: form-data; name="{name}"; filename="upload"\r\n' \
                   "Content-Type: application/octet-stream\r\n\r\n"
            parts.append(f"--{boundary}\r\n{head}".encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


async def parse_form(headers: Headers, raw: bytes, route: Route) -> dict[str, bytes | int]:
    """Multipart fields checked against the route: each declared field once, the file a readable image."""

    async def stream():
        yield raw

    parser = MultiPartParser(headers, stream(), max_files=1, max_fields=len(route.fields),
                             max_part_size=FORM_OVERHEAD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart form: {exc.message}") from None
    except Exception as exc:  # python-multipart's own parse errors
        raise RequestError(400, f"malformed multipart form: {exc}") from None
    try:
        names = [name for name, _ in form.multi_items()]
        unknown = sorted(set(names) - route.fields)
        repeated = sorted({n for n in names if names.count(n) > 1})
        missing = sorted(route.required - set(names))
        if unknown or repeated or missing:
            problems = [f"{what} {', '.join(which)}" for what, which in
                        (("unknown field(s)", unknown), ("repeated field(s)", repeated),
                         ("missing field(s)", missing)) if which]
            optional = f" (optional: {', '.join(route.optional_bools)})" if route.optional_bools else ""
            raise RequestError(400, f"{'; '.join(problems)}; expected {', '.join(sorted(route.required))}{optional}")
        fields: dict[str, bytes | int] = {}
        upload = form[route.file_field]
        if not isinstance(upload, UploadFile):
            raise RequestError(400, f"`{route.file_field}` must be an uploaded file (multipart file part), "
                                    "not a text value; URLs are not fetched")
        fields[route.file_field] = check_image_bytes(await upload.read())
        for name, (low, high) in route.int_fields.items():
            value = form[name]
            if isinstance(value, UploadFile):
                raise RequestError(400, f"{name} must be a form value {low}-{high}, not a file")
            if not (value.strip().isascii() and value.strip().isdigit()) or not low <= int(value) <= high:
                raise RequestError(400, f"{name} must be an integer {low}-{high}; got {value[:40]!r}")
            fields[name] = int(value)
        for name in route.optional_bools:
            if name not in form:
                continue
            value = form[name]
            if isinstance(value, UploadFile) or value.strip().lower() not in BOOLEANS:
                shown = "a file" if isinstance(value, UploadFile) else repr(value[:40])
                raise RequestError(400, f"{name} must be true or false; got {shown}")
            fields[name] = BOOLEANS[value.strip().lower()]
        return fields
    finally:
        await form.close()


def check_image_bytes(data: bytes) -> bytes:
    """The upload, if serving/image.py's header checks pass: 413 past the size limit, else 400 saying why."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(413, too_large(len(data)))
    try:
        check_header(data)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None
    return data


def too_large(size: int, at_least: bool = False) -> str:
    return (f"the request is {'over ' if at_least else ''}{size} bytes; the image limit is {MAX_UPLOAD_BYTES} "
            "bytes")


async def respond(scope, receive, send, status: int, message: str, headers: dict | None = None) -> None:
    """A JSON error response; the connection is closed after it, since the body may be unread."""
    response = error_response(status, message)
    response.headers.update(headers or {})
    response.headers["connection"] = "close"
    await response(scope, receive, send)


async def drain(receive, seconds: float = DRAIN_SECONDS, limit: int = DRAIN_BYTES) -> None:
    """Read and discard the rest of a request body: until its end, a disconnect, `seconds` or `limit` bytes.
    (After a response, uvicorn's receive() only says disconnect, so this has to come before it.)"""
    dropped = 0
    try:
        async with asyncio.timeout(seconds):
            while dropped <= limit:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))
    except TimeoutError:
        pass
