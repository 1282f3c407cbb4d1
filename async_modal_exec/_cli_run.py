"""The ``run`` command: code in a fresh kernel, thrown away after it, as ``python -c`` runs it.

What the program sees is what ``python -c`` gives it: a clean ``sys.argv``,
``exit()`` that stops the code, a ``SystemExit`` that is the exit status.
Output past the cap is cut with a line on stderr that says so and names the
option that raises it; the value of the last expression is still printed.
Messages say what happened to this run, never what a next one would find.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from .backends import Backend
from .executor import AsyncExecutor
from .fold import ExecutionFold, MarkerEvent, OutputCap, loss_marker, truncation_marker
from .results import (
    DisplayEvent,
    ErrorEvent,
    Event,
    ExecutionError,
    ExecutionResult,
    ExecutionTimeout,
    KernelDied,
    RecoveryOutcome,
    RemoteError,
    ResultEvent,
    RichOutput,
    StderrEvent,
    StdoutEvent,
)

EXIT_CODE_ERROR = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_TIMEOUT = 124
EXIT_KERNEL_DIED = 125
EXIT_INTERRUPTED = 130

# What a long-lived executor says about its next run. The command line runs
# once and throws the kernel away: it says what happened in its own words.
_LATER_RUNS = re.compile(
    r"; the next run [^;]*|; (?:replacing it with|starting) a fresh kernel|"
    r" \((?:its|the kernel's) state is (?:kept|lost)[^)]*\)"
)


def about_later_runs(record: logging.LogRecord) -> bool:
    """Log filter: drop the executor's lines about its next run (there is none)."""
    return _LATER_RUNS.search(record.getMessage()) is None


def one_shot(message: str) -> str:
    """``message`` without what it says about the next run or the kept state."""
    return _LATER_RUNS.sub("", message)


def _describe(output: RichOutput) -> str:
    if output.text is not None:
        return output.text
    return ", ".join(
        f"[{mime}: {len(value)} bytes]" if isinstance(value, bytes) else f"[{mime}]"
        for mime, value in output.data.items()
    )


class _LiveProgress:
    """On a terminal: one line, rewritten in place, naming the phase and its elapsed seconds."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.phase: str | None = None
        self.began = time.monotonic()

    def __call__(self, phase: str, seconds: float | None) -> None:
        self.stream.write("\r\x1b[K")  # the phase's own log line follows when it ends
        self.stream.flush()
        self.phase, self.began = (phase, time.monotonic()) if seconds is None else (None, 0.0)

    async def tick(self) -> None:
        while True:
            if self.phase is not None:
                elapsed = time.monotonic() - self.began
                self.stream.write(f"\r\x1b[K  {self.phase.replace('_', ' ')}... {elapsed:.1f} s")
                self.stream.flush()
            await anyio.sleep(0.2)


async def _start(executor: AsyncExecutor, err: TextIO, *, modal_output: bool) -> None:
    """Start ``executor``; on a terminal, with a live progress line meanwhile.

    With ``modal_output`` (a Modal backend, stdout a terminal too), Modal's own
    display shows an image build's output as it is written.
    """
    if not err.isatty():
        await executor.start()
        return
    progress = _LiveProgress(err)
    executor.on_progress = progress
    with _modal_display() if modal_output and sys.stdout.isatty() else contextlib.nullcontext():
        async with anyio.create_task_group() as group:
            group.start_soon(progress.tick)
            try:
                await executor.start()
            finally:
                group.cancel_scope.cancel()
                progress("", 0.0)  # clear the line


def _modal_display() -> contextlib.AbstractContextManager[None]:
    import modal

    return modal.enable_output()


# -- run in the kernel (shipped as source: standard library only, no name bound in the user's namespace)


def _kernel_prepare(shell: Any, argv: list[str]) -> None:
    """In the fresh kernel, before the code: what ``python -c`` gives a program.

    ``sys.argv`` as python sets it (not the kernel launcher's); ``exit()`` and
    ``quit()`` raise ``SystemExit`` as in a script (IPython's only ask the
    front end to close the kernel, and the code goes on); IPython's advice
    after a ``SystemExit`` ("To exit: use 'exit', 'quit', or Ctrl-D.") is
    silenced. ``shell``: the kernel's IPython shell (None: not IPython).
    """
    import sys
    import warnings

    class Exit:
        def __init__(self, name: str) -> None:
            self.name = name

        def __repr__(self) -> str:
            return f"Use {self.name}() or Ctrl-D (i.e. EOF) to exit"

        def __call__(self, code: object = None) -> None:
            raise SystemExit(code)

    sys.argv = list(argv)
    warnings.filterwarnings("ignore", message=r"To exit: use 'exit', 'quit', or Ctrl-D\.")
    if shell is not None:
        for name in ("exit", "quit"):
            shell.user_ns[name] = shell.user_ns_hidden[name] = Exit(name)


def _kernel_exit_status(error: BaseException | None) -> list[Any] | None:
    """``[status, message or None]`` python exits with for ``error``; None if it is not a ``SystemExit``.

    As python decides: no code, 0; an int, itself modulo 256; anything else,
    printed on stderr and 1.
    """
    if not isinstance(error, SystemExit):
        return None
    if error.code is None:
        return [0, None]
    if isinstance(error.code, int):
        return [error.code & 255, None]
    return [1, str(error.code)]


def _in_kernel(function: Any, call: str, **names: str) -> str:
    """One line running ``function``'s source, then ``call``, in a namespace of its own.

    ``names``: expressions evaluated in the user's namespace, bound in that one.
    """
    code = f"from __future__ import annotations\n{inspect.getsource(function)}\n{call}\n"
    bound = "".join(f", {key!r}: {expression}" for key, expression in names.items())
    namespace = f"{{'__name__': '_async_modal_exec_run'{bound}}}"
    return f"exec(compile({code!r}, '<async_modal_exec run>', 'exec'), {namespace})"


def setup_code(argv: Sequence[str]) -> str:
    """The code run before the user's: :func:`_kernel_prepare` with ``argv``."""
    return _in_kernel(
        _kernel_prepare,
        "_kernel_prepare(shell, argv)",
        shell="globals().get('get_ipython', lambda: None)()",
        argv=repr(list(argv)),
    )


EXIT_STATUS_CODE = _in_kernel(
    _kernel_exit_status,
    "print(repr(_kernel_exit_status(getattr(__import__('sys'), 'last_value', None))))",
)


class _OneShotExecutor(AsyncExecutor):
    """The executor of ``run``: the value of the last expression has an output budget of its own.

    Printed output that fills ``max_output_chars`` must not drop the answer
    the code ends with: the command line prints the value after the cut output.
    """

    def _new_fold(self, code: str, *, capped: bool = True) -> ExecutionFold:
        fold = super()._new_fold(code, capped=capped)
        if capped and self.max_output_chars is not None:
            fold.value_cap = OutputCap(self.max_output_chars)
        return fold


class _Printer:
    """Writes a run's events as they arrive: output to stdout, the rest to stderr."""

    def __init__(self, out: TextIO, err: TextIO, max_output_chars: int | None) -> None:
        self.out, self.err = out, err
        self.max_output_chars = max_output_chars
        self.line_open = False  # stdout's last text did not end a line
        self.error: RemoteError | None = None
        self.told_cut = False

    def show(self, event: Event) -> None:
        if isinstance(event, MarkerEvent):
            self.tell_cut(event.text, event.truncated_chars)
        elif isinstance(event, StdoutEvent):
            self.out.write(event.text)
            self.out.flush()
            self.line_open = not event.text.endswith("\n")
        elif isinstance(event, StderrEvent):
            self.err.write(event.text)
            self.err.flush()
        elif isinstance(event, ResultEvent | DisplayEvent):
            if self.line_open:  # output cut mid-line, or print(..., end=""): the value on its own line
                self.out.write("\n")
            self.out.write(_describe(event.output) + "\n")
            self.out.flush()
            self.line_open = False
        elif isinstance(event, ErrorEvent):
            self.error = event.error
            if event.error.ename != "SystemExit":  # an exit is a status, not a failure to show
                self.err.write(str(event.error) + "\n")
                self.err.flush()

    def tell_cut(self, marker: str, truncated_chars: int) -> None:
        """On stderr: what the output cap dropped (with the option that raises it), what was lost."""
        if self.told_cut or not marker:
            return
        self.told_cut = True
        self.out.flush()
        for line in marker.strip().splitlines():
            self.err.write(line + "\n")
        if truncated_chars and self.max_output_chars is not None:
            self.err.write(
                f"  the output cap is {self.max_output_chars} characters:"
                " raise it with --max-output-chars N (0: no cap)\n"
            )
        self.err.flush()

    def cut_short(self, result: ExecutionResult) -> None:
        """A run stopped before its end (no marker came): tell what its partial result says was cut."""
        marker = truncation_marker(result.truncated_chars) if result.truncated_chars else ""
        marker += loss_marker(result.lost_messages) if result.lost_messages else ""
        self.tell_cut(marker, result.truncated_chars)


async def _exit_status(executor: AsyncExecutor, error: RemoteError) -> tuple[int, str | None]:
    """The status (and message) python would exit with for the ``SystemExit`` the code raised."""
    try:
        answer = await executor.run(EXIT_STATUS_CODE, timeout=10)
        found = ast.literal_eval(answer.stdout.strip())
    except (ExecutionError, ValueError, SyntaxError):
        found = None
    if isinstance(found, list) and len(found) == 2 and isinstance(found[0], int):
        return found[0], found[1] if isinstance(found[1], str) else None
    # Not answered: read the exception's text instead (a str code that looks like a number reads as one).
    text = error.evalue.strip()
    if text in ("", "None"):
        return 0, None
    if re.fullmatch(r"-?\d+", text):
        return int(text) & 255, None
    return EXIT_CODE_ERROR, text


_STOPPED = {  # what became of the code (the kernel is thrown away in any case)
    RecoveryOutcome.INTERRUPTED: "{} was interrupted",
    RecoveryOutcome.REPLACED: "{} did not stop when interrupted; its kernel was shut down",
    RecoveryOutcome.DEFERRED: "{} was stopped; its kernel could not be brought back",
    RecoveryOutcome.UNREACHABLE: "{} could not be interrupted: the gateway did not answer",
    RecoveryOutcome.NOT_STARTED: "{} never started",
}


def timed_out(exc: ExecutionTimeout, what: str = "the code") -> str:
    """A timeout in the command line's words: what stopped, not what a next run would find."""
    cause = str(exc).removesuffix(f"; {exc.recovery.describe()}")
    if not getattr(exc, "step", ""):  # a setup step's own bound is not --timeout
        cause += " (--timeout)"
    return f"{one_shot(cause)}; {_STOPPED[exc.recovery].format(what)}"


def kernel_died(exc: KernelDied) -> str:
    return (
        f"{one_shot(str(exc))} (os._exit(), a crash or running out of memory ends the kernel process"
        f" itself, whose exit status does not reach here: exit status {EXIT_KERNEL_DIED})"
    )


async def run(
    code: str,
    argv: Sequence[str],
    backend: Backend,
    timeout: float | None,
    ready_timeout: float,
    max_output_chars: int | None,
    modal_output: bool,
    put: Sequence[Sequence[str]] = (),
    get: Sequence[Sequence[str]] = (),
) -> int:
    out, err = sys.stdout, sys.stderr
    started = time.monotonic()
    err.write(f"starting {type(backend).__name__}...\n")
    err.flush()
    status = 0
    executor = _OneShotExecutor(
        backend, timeout=timeout, gateway_timeout=ready_timeout, max_output_chars=max_output_chars
    )
    printer = _Printer(out, err, max_output_chars)
    try:
        await _start(executor, err, modal_output=modal_output)
        err.write(f"kernel ready in {time.monotonic() - started:.1f} s\n")
        err.flush()
        for local, remote in put:
            info = await executor.upload(local, remote)
            err.write(f"put {local} -> {info.path} ({info.size} bytes)\n")
        await executor.run(setup_code(argv))
        try:
            async with contextlib.aclosing(executor.stream(code)) as events:
                async for event in events:
                    printer.show(event)
        except ExecutionTimeout as exc:
            printer.cut_short(exc.result)
            err.write(f"error: {timed_out(exc)}\n")
            return EXIT_TIMEOUT
        except KernelDied as exc:
            printer.cut_short(exc.result)
            err.write(f"error: {kernel_died(exc)}\n")
            return EXIT_KERNEL_DIED
        if printer.error is not None and printer.error.ename == "SystemExit":
            status, message = await _exit_status(executor, printer.error)
            if message is not None:
                err.write(message + "\n")
        elif printer.error is not None:
            status = EXIT_CODE_ERROR
        for remote, local in get:
            info = await executor.download(remote, local)
            err.write(f"get {info.path} -> {local} ({info.size} bytes)\n")
    finally:
        await executor.aclose()
    return status
