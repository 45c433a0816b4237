"""Client mistakes answered with a 4xx that names the problem, in one place.

:class:`ClientError` is what the service raises for a request it cannot answer;
:func:`client_errors` turns it into its HTTP answer for every BentoML API and route, and
:class:`RequestGuard` answers the mistakes in a request's framing before BentoML parses it:
bodies over the upload limit, and multipart forms whose fields the API does not take or whose
part headers or file names are oversized (BentoML 1.4 answers some of those with a 500: a
binary part under an unknown name fails its JSON decoding, a long file name its temporary file).
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse

MAX_FILENAME = 255  # characters: what a file system allows a file name
MAX_PART_HEADER = 4096  # bytes of one part header line


class ClientError(Exception):
    """A request the service cannot answer; ``status`` and the message go back to the client."""

    status = 422

    def __init__(self, problem: str, file: str | None = None) -> None:
        super().__init__(f"{file}: {problem}" if file else problem)
        self.problem, self.file = problem, file

    def response(self) -> JSONResponse:
        body = {"error": str(self), "problem": self.problem, **({"file": self.file} if self.file else {})}
        return JSONResponse(body, status_code=self.status)


class BadRequest(ClientError):
    status = 400


class TooLarge(ClientError):
    status = 413


class Busy(ClientError):
    status = 503  # not the client's mistake: shed load, retry later


class WrongTask(ClientError):
    status = 409  # the route exists, the loaded model answers another task's question


ROUTES = {"classify": "/classify, /classify_batch, /group_verdict, /features, /embed, /raw/classify",
          "enhance": "/enhance, /enhance_batch, /raw/enhance"}


def wrong_task(served: str, asked: str) -> str:
    return f"this service serves a model of task {served}, not {asked}: use {ROUTES[served]}"


def too_large(size: int, limit: int) -> str:
    return f"upload of {size} bytes exceeds the limit of {limit / 2**20:g} MB ({limit} bytes)"


def client_errors(api: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """The one place where a :class:`ClientError` becomes its HTTP answer (BentoML APIs and routes).

    BentoML's own mapping of its exceptions logs a traceback per request and wraps the body in
    a list, so client mistakes are answered here instead.
    """
    @functools.wraps(api)
    async def answer(*args: Any, **kwargs: Any) -> Any:
        try:
            return await api(*args, **kwargs)
        except ClientError as err:
            return err.response()
    return answer


def multipart_problem(body: bytes, content_type: str, fields: dict[str, bool]) -> str | None:
    """What is wrong with a multipart/form-data ``body`` for an API taking ``fields`` (name: whether
    it is a file upload), or None."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return "multipart body without a boundary in its Content-Type"
    problems: list[str] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]
        if len(header["value"]) > MAX_PART_HEADER:
            raise MultipartParseError(f"a part header longer than {MAX_PART_HEADER} bytes")

    def on_header_end() -> None:
        if bytes(header["field"]).lower() == b"content-disposition":
            _, disposition = parse_options_header(bytes(header["value"]))
            name = disposition.get(b"name", b"").decode("utf-8", "replace")
            filename = disposition.get(b"filename", b"").decode("utf-8", "replace")
            if name not in fields:
                problems.append(f"unexpected form field {name!r}: this API takes {', '.join(sorted(fields))}")
            elif fields[name] and not filename:
                problems.append(f"form field {name!r} must be a file upload (a part with a file name)")
            if len(filename) > MAX_FILENAME:
                problems.append(f"file name of {len(filename)} characters exceeds the limit of {MAX_FILENAME}")
        header["field"], header["value"] = bytearray(), bytearray()

    callbacks = {"on_header_field": lambda d, s, e: header["field"].extend(d[s:e]),
                 "on_header_value": on_header_value, "on_header_end": on_header_end}
    try:
        parser = MultipartParser(boundary, callbacks, max_header_size=MAX_PART_HEADER + 128)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        return f"malformed multipart body: {err}"
    return problems[0] if problems else None


class RequestGuard:
    """ASGI middleware in front of the service: the upload limit, and the multipart check above.

    ``limit`` is the upload limit in bytes; ``fields`` maps each API's path to the form fields it
    takes (name: whether it is a file upload).
    A multipart body is buffered (within the limit), checked, then handed on unchanged.
    """

    def __init__(self, app: Any, fields: dict[str, dict[str, bool]], limit: int) -> None:
        self.app, self.fields, self.limit = app, fields, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length, limit = headers.get(b"content-length", b"0"), self.limit
        if length.isdigit() and int(length) > limit:
            return await TooLarge(too_large(int(length), limit)).response()(scope, receive, send)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        fields = self.fields.get(scope["path"])
        if fields is None or not content_type.startswith("multipart/form-data"):
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > limit:  # chunked uploads carry no Content-Length
                return await TooLarge(too_large(len(body), limit)).response()(scope, receive, send)
            if not message.get("more_body"):
                break
        if problem := multipart_problem(bytes(body), content_type, fields):
            return await BadRequest(problem).response()(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)
