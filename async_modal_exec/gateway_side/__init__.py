"""The gateway side: what runs next to Jupyter Kernel Gateway, in the sandbox or on this host.

It starts Kernel Gateway tuned for low latency and whole outputs. It imports
nothing from the rest of ``async_modal_exec`` (only the standard library and
the gateway's own dependencies), because it runs where this package is not
installed: a Modal sandbox whose image has only ``jupyter_kernel_gateway`` and
``ipykernel``. :mod:`async_modal_exec.launcher` starts it there (its modules'
sources in a ``python -c`` command) and locally (from these files, loaded
under a private name by :mod:`.bootstrap`); ``python -m
async_modal_exec.launcher`` runs it too. The client imports its
:mod:`.v1_codec` (never the other way round).

What it changes compared with ``jupyter kernelgateway``, by module:

* :mod:`.patches`: ``TCP_NODELAY`` on every kernel websocket (Tornado leaves
  Nagle's algorithm on, and the kernel's small replies then wait for delayed
  ACKs: about 43 ms added to every execution); binary (v1) websocket frames
  written in pieces (:mod:`.v1_codec`), the message parts not copied into one
  buffer and then into the frame; IPython kernels started through the
  bootstrap and start-up lines of :mod:`.kernel_code`; with ``--kernel-jail``,
  every kernel run through ``kernel_jail.py`` (a bubblewrap sandbox with
  resource limits, see :mod:`async_modal_exec.backends.isolation`), with
  message-based interrupts.
* :mod:`.kernel_code`: ``--Kernel._execute_sleep=0`` (ipykernel sleeps
  0.5 ms before every ``execute_reply`` for clients that stop at the reply;
  ours ends an execution on IOPub's ``idle``), and :mod:`.kernel_patches`
  (a real module, shipped to the kernel as text) run in each kernel: no
  IOPub high-water mark (bursts of output lost messages silently), lone
  surrogates in output arrive as U+FFFD, a thread's output belongs to the
  cell that started it, stdout and stderr arrive in the order they were
  written.
* :mod:`.kernel_manager`: a runtime directory per kernel (and a work
  directory, when jailed without a shared one), removed with the kernel;
  unsigned messages over IPC in a ``0700`` runtime directory of ours
  (``--sign-messages`` to sign anyway); a lighter IOPub activity watcher; no
  kernel left by a failed start; a stop that stops every kernel.
* :mod:`.tuning`: IOPub data-rate limit lifted, IPC transport, faster
  restarter, ZeroMQ socket cap and high-water marks, the open-file limit, a
  start in about 0.4 s instead of 1.3 s, a short runtime directory.
* :mod:`.reaping`: a child subreaper (abandoned processes stay in the
  gateway's tree), ``--exit-on-stdin-eof``.
* :mod:`.auth_token`: the token is read from ``KG_AUTH_TOKEN`` in the
  environment, never argv, and then scrubbed: the launcher replaces itself
  (same pid, ``exec``) with an environment without it and takes the token
  over a pipe, so neither ``/proc/<gateway>/environ`` nor the kernels'
  environments hold it.
* :mod:`.main`: the command line, the port line, ``--nice``, what is removed
  when the gateway stops (:mod:`.cleanup`).
"""
