"""A local double of Modal's control plane, for driving the real ``modal`` client offline.

The real client is pointed at a grpclib server on 127.0.0.1 (``MODAL_SERVER_URL``)
that implements the RPCs this package needs from the client's own protocol
definitions (``modal_proto``). Every other RPC answers UNIMPLEMENTED and is
recorded, so a client upgrade that starts using a new RPC fails with its name.
A test can make an implemented RPC answer a gRPC error instead
(``ModalDouble.failing(rpc, status, message)``), to see what the real client
raises for it.

A "sandbox" is a local process running the entrypoint given to
``Sandbox.create`` with the current interpreter, its secrets in the
environment, and each container port of ``encrypted_ports`` mapped to a free
loopback port: an argument equal to the container port, or ending in
``=<port>``, is rewritten to the host port. A TLS proxy with a self-signed
certificate sits in front of each such port, so ``Tunnel.url`` is a working
``https://127.0.0.1:<port>`` URL; ``ModalDouble.ssl_context()`` trusts it.
"""

from .server import ModalDouble

__all__ = ["ModalDouble"]
