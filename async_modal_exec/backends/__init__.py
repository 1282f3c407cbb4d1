"""Backends provide a running Kernel Gateway: locally, on Modal, or at a URL."""

from .base import Backend, GatewayEndpoint, Sandbox
from .local import LocalBackend
from .remote import GatewayBackend

__all__ = ["Backend", "GatewayBackend", "GatewayEndpoint", "LocalBackend", "Sandbox"]
