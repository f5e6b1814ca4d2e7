"""tasker-worker: the Python SDK for Tasker workers and the services that use Tasker.

A **worker** consumes step queues on RabbitMQ, runs the handler each step names, publishes the
result (with a broker confirm) and only then acknowledges the step message (schemas/CONTRACT.md,
wire schema 1.1). A **client** submits tasks over HTTP ([`Client`], [`AsyncClient`]) or AMQP
([`submit_amqp`]) and waits for them.

```python
from tasker_worker import Permanent, StepContext, Worker

worker = Worker(
    "amqp://guest:guest@127.0.0.1:5672/%2f", queues=["default"], namespaces="shop", concurrency=32
)

@worker.handler("charge_payment")
async def charge(ctx: StepContext) -> dict:
    if ctx.context.get("total", 0) <= 0:
        raise Permanent("nothing to charge")
    return {"charge_id": f"ch_{ctx.idempotency_key}"}

worker.run_forever()
```
"""

from .client import (
    AmqpSubmitter,
    AsyncClient,
    Client,
    ClientError,
    StepView,
    Submitted,
    TaskList,
    TaskTimeout,
    TaskView,
    submit_amqp,
)
from .context import Cancellation, StepContext
from .errors import Decision, Permanent, Retryable, StepError
from .wire import DecodeError, Names, uuid7
from .worker import Worker, WorkerError, WorkerStats

__version__ = "0.1.0"

__all__ = [
    "AmqpSubmitter",
    "AsyncClient",
    "Cancellation",
    "Client",
    "ClientError",
    "Decision",
    "DecodeError",
    "Names",
    "Permanent",
    "Retryable",
    "StepContext",
    "StepError",
    "StepView",
    "Submitted",
    "TaskList",
    "TaskTimeout",
    "TaskView",
    "Worker",
    "WorkerError",
    "WorkerStats",
    "__version__",
    "submit_amqp",
    "uuid7",
]
