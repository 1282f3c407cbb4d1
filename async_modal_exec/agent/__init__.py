"""smolagents integration: a synchronous executor facade, factories, and run_agent."""

from .._extras import require

require("smolagents", "The smolagents integration (Executor, create_*_executor, run_agent)")

from .facade import Executor, StepTimeoutError
from .factories import create_gateway_executor, create_local_executor, create_modal_executor
from .requirements import IMPORT_TO_DISTRIBUTION, Requirement
from .run import run_agent

__all__ = [
    "IMPORT_TO_DISTRIBUTION",
    "Executor",
    "Requirement",
    "StepTimeoutError",
    "create_gateway_executor",
    "create_local_executor",
    "create_modal_executor",
    "run_agent",
]
