"""A final answer that cannot be sent safely falls back to its repr instead of failing the step.

smolagents patches the ``final_answer`` tool so that, in the sandbox, it
raises ``FinalAnswerException`` with the answer serialized (``safe:`` JSON, or
``pickle:`` when allowed). Without pickle, an answer its serializer refuses (a
function, an instance of a class the code defined) raises
``SerializationError: Cannot safely serialize object of type ...`` and fails
the step, although the code did nothing wrong. :func:`patch_repr_fallback`
wraps smolagents' patched ``forward`` (kept as it is, under another name) in
one that sends the answer's repr in that case, as smolagents itself does as a
last resort when pickle is allowed but fails.

The methods below run in the kernel: they are sent as source, so they use
nothing from this module.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["patch_repr_fallback"]


def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    import json

    answer = self._forward(*args, **kwargs)

    class _Given:  # stands in for self: smolagents' forward gets the answer already computed
        def _forward(self, *args: Any, **kwargs: Any) -> Any:
            return answer

    try:
        type(self)._serialize_final_answer(_Given())  # raises FinalAnswerException when it can
    except Exception as exc:
        if type(exc).__name__ != "SerializationError":
            raise

    class FinalAnswerException(BaseException):
        def __init__(self, value: Any) -> None:
            self.value = value

    raise FinalAnswerException("safe:" + json.dumps(repr(answer)))


def patch_repr_fallback(patched_class: type) -> None:
    """Wrap the ``forward`` smolagents set on ``patched_class`` (its patched final-answer class).

    smolagents' ``forward`` becomes ``_serialize_final_answer``; the user's
    own ``forward`` stays ``_forward`` and runs once.
    """
    serialize: Any = patched_class.__dict__["forward"]
    source = getattr(serialize, "__source__", None) or inspect.getsource(serialize)
    serialize.__source__ = source.replace("def forward(", "def _serialize_final_answer(", 1)
    patched_class._serialize_final_answer = serialize  # type: ignore[attr-defined]
    patched_class.forward = forward  # type: ignore[attr-defined]
