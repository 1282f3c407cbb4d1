"""The code blocks of the README and of ``docs/``, and a runner for a page's Python blocks.

Every fenced block says its language. ``python`` and ``bash`` blocks are run by
``tests/test_docs_examples.py``; ``text`` (diagrams, trees) and ``diff`` (a
change shown, its result is a ``python`` block next to it) are not code.

Running a page (``python tests/docs_examples.py docs/quickstart.md``) executes its
Python blocks in order in one namespace, the way a reader pastes them into one
session: top-level ``await`` runs on one event loop, other blocks run as they
are (``asyncio.run(main())`` included). A line like ``result.stdout  # 'hi\\n'``
(an expression with a Python literal as its comment) is checked: the
expression must equal the literal. Names a block uses that the page never
defines are the reader's own (``model``, ``tools``, ``executor``, ...): the
runner supplies them from :data:`READERS_OWN`, real objects (a started executor,
a scripted smolagents model), never mocks. Tracebacks point at the page's lines.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import inspect
import io
import re
import sys
import tokenize
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
RUNNABLE = ("python", "bash")
NOT_CODE = ("text", "diff")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # the line of the block's first source line
    lang: str
    source: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[str]:
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def blocks(page: str, lang: str | None = None) -> list[Block]:
    text = (ROOT / page).read_text()
    found = [
        Block(page, text.count("\n", 0, match.start("body")) + 1, match["lang"], match["body"])
        for match in _FENCE.finditer(text)
    ]
    return [block for block in found if lang is None or block.lang == lang]


# --- checked comments --------------------------------------------------------


class _LiteralComments(ast.NodeTransformer):
    """``expr  # <literal>`` becomes ``assert expr == <literal>`` (``print(...)`` lines excepted)."""

    def __init__(self, comments: dict[int, str]) -> None:
        self.comments = comments

    def visit_Expr(self, node: ast.Expr) -> ast.stmt:
        comment = self.comments.get(node.end_lineno or node.lineno)
        call = node.value
        if comment is None or (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "print"):
            return node
        try:
            ast.literal_eval(comment)  # a literal, nothing else: then its own expression is compared
        except (ValueError, SyntaxError):
            return node
        expected = ast.parse(comment, mode="eval").body  # lists and dicts are no ast.Constant
        check = ast.Assert(
            test=ast.Compare(left=node.value, ops=[ast.Eq()], comparators=[expected]),
            msg=ast.Constant(f"the page says {comment}"),
        )
        return ast.copy_location(check, node)


def _comments(source: str) -> dict[int, str]:
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def compile_block(block: Block) -> Any:
    tree = ast.parse(block.source, block.page)
    tree = ast.fix_missing_locations(_LiteralComments(_comments(block.source)).visit(tree))
    ast.increment_lineno(tree, block.line - 1)
    return compile(tree, str(ROOT / block.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def free_names(block: Block) -> set[str]:
    """Names the block reads but never binds itself (nor are built in)."""
    read, bound = set(), set()
    for node in ast.walk(ast.parse(block.source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return read - bound - set(dir(builtins))


# --- the reader's own names --------------------------------------------------


class _Readers:
    """Makes the names a page takes for granted, on demand, and closes what it made."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closers: list[Callable[[], Awaitable[None]]] = []

    def model(self) -> Any:
        from smolagents.models import ChatMessage, MessageRole, Model

        class AnsweringModel(Model):
            """A scripted model (no network): every step answers at once."""

            def generate(self, messages: list[Any], stop_sequences: Any = None, **kwargs: Any) -> ChatMessage:
                code = "final_answer('done')"
                return ChatMessage(
                    role=MessageRole.ASSISTANT, content=f"Thought: done.\n<code>\n{code}\n</code>"
                )

        return AnsweringModel(model_id="docs-scripted")

    def tools(self) -> list[Any]:
        return []

    def API_TOKEN(self) -> str:  # the page's own name
        return "docs-example-token"

    def KEY(self) -> str:  # the page's own name
        return "docs-example-key"

    def SignTool(self) -> type:
        from smolagents import Tool

        class SignTool(Tool):
            """A tool holding a secret given to its constructor."""

            name = "sign"
            description = "Signs a message."
            inputs = {"message": {"type": "string", "description": "the message"}}
            output_type = "string"

            def __init__(self, api_key: str) -> None:
                super().__init__()
                self.api_key = api_key

            def forward(self, message: str) -> str:
                return f"{message} signed"

        return SignTool

    def researcher(self) -> Any:
        from smolagents import CodeAgent

        return CodeAgent(tools=[], model=self.model(), name="researcher", description="Researches a topic.")

    def backend(self) -> Any:
        from async_modal_exec import LocalBackend

        backend = LocalBackend()
        self.closers.append(backend.aclose)
        return backend

    def executor(self) -> Any:
        from async_modal_exec import AsyncExecutor, LocalBackend

        executor = AsyncExecutor(LocalBackend(), timeout=30)
        self.loop.run_until_complete(executor.start())
        self.closers.append(executor.aclose)
        return executor

    def code(self) -> str:
        return "print('hi')\n1 + 1"

    def aclose(self) -> None:
        for close in reversed(self.closers):
            self.loop.run_until_complete(close())


READERS_OWN = [name for name in vars(_Readers) if not name.startswith("_") and name not in ("aclose",)]


def run_page(page: str) -> None:
    """Run the page's Python blocks in order; print ``ran <page>:<line>`` after each."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    loop = asyncio.new_event_loop()
    readers = _Readers(loop)
    try:
        for block in blocks(page, "python"):
            for name in sorted(free_names(block) - namespace.keys()):
                if name in READERS_OWN:
                    namespace[name] = getattr(readers, name)()
            code = compile_block(block)
            if code.co_flags & inspect.CO_COROUTINE:
                loop.run_until_complete(eval(code, namespace))
            else:
                exec(code, namespace)
            print(f"ran {block.name}", flush=True)
    finally:
        readers.aclose()
        loop.close()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    run_page(sys.argv[1])
