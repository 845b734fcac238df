"""distbreaker: a circuit breaker whose state every worker process shares through Redis.

State, counters and windows live in Redis and change only inside Lua scripts; each process
keeps a local snapshot so that availability checks and rejections never touch the network.
"""

from ._config import CircuitBreakerConfig, CircuitState
from ._errors import (
    CircuitBreakerError,
    CircuitOpenError,
    RedisMisconfiguredError,
    StoreUnavailableError,
)
from ._outcome import Permit
from ._snapshot import LocalSnapshot
from .breaker import (
    AsyncCircuitBreaker,
    AsyncCircuitBreakerInterface,
    BaseCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerInterface,
)
from .metrics import CircuitBreakerMetrics, FleetWindow, RequestRecord
from .providers import (
    AllProvidersUnavailableError,
    AsyncCircuitBreakerManager,
    AsyncProviderCircuitBreaker,
    CircuitBreakerManager,
    ProviderCircuitBreaker,
    ProviderType,
    circuit_breaker_protect,
    configure,
    get_circuit_breaker_manager,
    initialize_provider_circuit_breakers,
)
from .stores import MemoryStore

__version__ = "0.1.0"

__all__ = [
    "AllProvidersUnavailableError",
    "AsyncCircuitBreaker",
    "AsyncCircuitBreakerInterface",
    "AsyncCircuitBreakerManager",
    "AsyncProviderCircuitBreaker",
    "BaseCircuitBreaker",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitBreakerError",
    "CircuitBreakerInterface",
    "CircuitBreakerManager",
    "CircuitBreakerMetrics",
    "CircuitOpenError",
    "CircuitState",
    "FleetWindow",
    "LocalSnapshot",
    "MemoryStore",
    "Permit",
    "ProviderCircuitBreaker",
    "ProviderType",
    "RedisMisconfiguredError",
    "RequestRecord",
    "StoreUnavailableError",
    "__version__",
    "circuit_breaker_protect",
    "configure",
    "get_circuit_breaker_manager",
    "initialize_provider_circuit_breakers",
]
