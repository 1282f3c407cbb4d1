"""The server layer: code sessions served over HTTP (the public entry is :mod:`async_modal_exec.fastapi`).

One job per module, imports going one way (each may use those above it, and
the core; the core never imports this layer):

* :mod:`.errors`: the server's own exceptions (``SessionNotFound``);
* :mod:`.sessions`: sessions, each holding one pooled executor, and the store
  that keeps them by id and closes idle ones (no web framework needed);
* :mod:`.models`: the request and response shapes, and the limits on request bodies;
* :mod:`.streaming`: a streamed run as Server-Sent Events, keep-alives included;
* :mod:`.routes`: the FastAPI lifespan, dependencies and sessions router.

``models``, ``streaming`` and ``routes`` need the ``fastapi`` extra; import
them through :mod:`async_modal_exec.fastapi`, which checks it first.
"""
