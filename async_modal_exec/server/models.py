"""What the sessions router reads and answers: request shapes, body limits, result shapes.

Bodies are read here, not declared as FastAPI body parameters: FastAPI reads a
declared body whole, before any dependency (the token check too) runs, so a
limit could only be applied once all of it had arrived.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from ..results import ErrorEvent, Event, ExecutionTimeout, ResultEvent, StderrEvent, StdoutEvent

__all__ = ["Limits", "RunRequest", "event_jsonable", "failure", "status"]


class RunRequest(BaseModel):
    """Code to run in a session."""

    code: str
    timeout: float | None = Field(default=None, gt=0)


def too_large(limit: int) -> HTTPException:
    """413 for a body over ``limit`` bytes; it closes the connection."""
    # Closing the connection is what stops the client sending the rest:
    # on a kept-alive connection the server would have to read it all.
    return HTTPException(413, f"request body over {limit} bytes", headers={"Connection": "close"})


def _body_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors for a request body, located as FastAPI locates them (``("body", ...)``).

    Malformed JSON carries the raw body as its input: it is not echoed back.
    """
    errors: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        located = {**error, "loc": ("body", *error["loc"])}
        if error["type"] == "json_invalid":
            located["input"] = {}
        errors.append(located)
    return errors


@dataclass(frozen=True)
class Limits:
    """The limits of one sessions router (see :func:`~async_modal_exec.fastapi.sessions_router`)."""

    max_code_bytes: int
    max_body_bytes: int
    run_timeout: float | None
    max_file_bytes: int

    def refuse_announced(self, request: Request) -> None:
        """413 at once for a ``Content-Length`` over the limit (``max_file_bytes`` for a ``PUT``)."""
        limit = self.max_file_bytes if request.method == "PUT" else self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large(limit)

    async def run_request(self, request: Request) -> tuple[str, float | None]:
        """The code and the timeout of a ``/run`` or ``/stream`` body, checked.

        Raises:
            HTTPException: 413 for a body or code over its limit (as soon as
                that many bytes arrived), 400 when the client left mid-body.
            RequestValidationError: the body is not a valid :class:`RunRequest` (422).
        """
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body_bytes:
                    raise too_large(self.max_body_bytes)
        except ClientDisconnect as exc:
            raise HTTPException(400, "the client disconnected while sending the body") from exc
        try:
            run = RunRequest.model_validate_json(bytes(body))
        except ValidationError as exc:  # FastAPI's 422, as for a declared body
            raise RequestValidationError(_body_errors(exc)) from None
        if len(run.code.encode()) > self.max_code_bytes:
            raise HTTPException(413, f"code over {self.max_code_bytes} bytes")
        timeout = run.timeout if run.timeout is not None else self.run_timeout
        if self.run_timeout is not None and timeout is not None:
            timeout = min(timeout, self.run_timeout)
        return run.code, timeout

    async def file_body(self, request: Request) -> AsyncIterator[bytes]:
        """The chunks of an uploaded file as they arrive; 413 past ``max_file_bytes``."""
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > self.max_file_bytes:
                    raise too_large(self.max_file_bytes)
                yield chunk
        except ClientDisconnect as exc:
            raise HTTPException(400, "the client disconnected while sending the file") from exc


def event_jsonable(event: Event) -> dict[str, Any]:
    """The ``data`` of a streamed event as JSON."""
    if isinstance(event, StdoutEvent | StderrEvent):
        return {"text": event.text}
    if isinstance(event, ErrorEvent):
        error = event.error
        return {"ename": error.ename, "evalue": error.evalue, "traceback": list(error.traceback)}
    data = event.output.to_jsonable()
    if isinstance(event, ResultEvent):
        data["execution_count"] = event.execution_count
    return data


def failure(exc: Exception) -> dict[str, Any]:
    """The ``failure`` object of ``/run`` and of ``/stream``'s ``failure`` event (one shape for both).

    ``type`` is the exception class (``ExecutionTimeout``, ``KernelDied``,
    ``ExecutionError``, ``SessionNotFound``), ``message`` its text; a timeout
    adds ``recovery`` (a :class:`~async_modal_exec.RecoveryOutcome` value) and
    ``state_kept`` (whether the kernel's variables survived).
    """
    shape: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ExecutionTimeout):
        shape["recovery"] = exc.recovery.value
        shape["state_kept"] = exc.recovery.state_kept
    return shape


def status(result: dict[str, Any]) -> str:
    """``ok``, ``error`` (the code raised) or ``failed`` (the execution did not complete)."""
    if "failure" in result:
        return "failed"
    return "error" if result.get("error") is not None else "ok"
