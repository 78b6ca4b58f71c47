"""The Lambda side: pull EventBridge deliveries from the queues, invoke the real handlers.

Each queue stands for one function of the template (the rule's target); its environment
is the function's, as synthesized, with the references resolved to the moto resources.
The handler modules are imported afresh with that environment (their module-scope wiring
reads settings and builds clients once, as at a Lambda cold start) and called with a
Lambda-like context. Like Lambda, events are handled concurrently (one invocation per
event, up to `CONCURRENCY` at once): a burst of warnings must not wait in line for one
another's handlers. Each invocation has Powertools' metric state to itself, as each
Lambda execution environment does (`isolated_metrics`). A failed invocation is left on
the queue and retried, like Lambda's async retries; after three attempts it is parked
and reported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any

from trainctl.rehearse.cloud import ACCOUNT, Provisioned

logger = logging.getLogger("trainctl.rehearse")

MAX_RECEIVES = 3
RETRY_SECONDS = 2  # a failed invocation's event is visible again (retried) after this
# Invocations at once. Lambda would run every event of a burst at once, each in an
# environment of its own; here they are threads of one process, and moto serves one
# request at a time (its dispatch is serialised), so more threads only queue on moto
# (256 barely changed how many of a 200-job burst's checkpoint commands were sent within
# the notice). 32 keeps duplicate events racing and a burst's warnings overlapping, with
# fewer threads sharing the handlers' module state (Powertools' Logger keys, the
# idempotency config's Lambda context; Metrics are made per thread, `isolated_metrics`).
CONCURRENCY = 32


@dataclass
class LambdaContext:
    """The attributes Powertools reads from a real Lambda context."""

    function_name: str
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:trainctl"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@dataclass
class Invocation:
    function: str
    event_id: str
    detail_type: str
    instance_id: str | None
    at: float
    response: dict[str, Any] | None = None
    error: str | None = None


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, with None, remove) variables; restore the previous values afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def load_handlers(provisioned: Provisioned) -> dict[str, Any]:
    """Import each target function's handler module afresh; returns logical id -> callable.

    The caller must have pointed the process at moto (AWS_ENDPOINT_URL, credentials) and
    set the functions' environment (`patched_environ`) before calling.
    """
    from trainctl_core import clients, settings
    from trainctl_core.observability import logger as powertools_logger

    clients.reset()
    settings.get_settings.cache_clear()

    # The handlers' log lines would drown the progress; their failures are in the report.
    powertools_logger.setLevel(logging.CRITICAL)
    handlers = {}
    for logical_id, spec in provisioned.handlers.items():
        module_name, attribute = spec.rsplit(".", 1)
        sys.modules.pop(module_name, None)
        module = importlib.import_module(module_name)
        handlers[logical_id] = _without_metrics(getattr(module, attribute))
    return handlers


class _PerThreadDict(MutableMapping[str, Any]):
    """A dict of which every thread sees a copy of its own, starting as `seed()`."""

    def __init__(self, seed: Callable[[], dict[str, Any]]) -> None:
        self._seed = seed
        self._local = threading.local()

    @property
    def _data(self) -> dict[str, Any]:
        data: dict[str, Any] | None = getattr(self._local, "data", None)
        if data is None:
            data = self._local.data = self._seed()
        return data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()


class _PerThreadList(MutableSequence[Any]):
    """A list of which every thread sees a copy of its own, starting empty."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def _data(self) -> list[Any]:
        data: list[Any] | None = getattr(self._local, "data", None)
        if data is None:
            data = self._local.data = []
        return data

    def __getitem__(self, index: Any) -> Any:
        return self._data[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._data[index] = value

    def __delitem__(self, index: Any) -> None:
        del self._data[index]

    def __len__(self) -> int:
        return len(self._data)

    def insert(self, index: int, value: Any) -> None:
        self._data.insert(index, value)


@contextlib.contextmanager
def isolated_metrics() -> Iterator[None]:
    """Give every thread its own Powertools metric state while the rehearsal runs.

    The handlers share one `Metrics` (module scope, as in a Lambda environment, where
    one invocation runs at a time). Its metric, dimension and metadata sets are plain
    dicts: invocations on concurrent threads would add to, overwrite ("Dimension ...
    has already been added") and clear one another's, and a set that reaches 100
    values is printed as EMF to stdout, which `--json` reserves for the report. Per
    thread, each invocation sees only its own, as it would on Lambda.
    """
    from trainctl_core.observability import metrics

    provider = metrics.provider

    def defaults() -> dict[str, Any]:
        return {k: str(v) for k, v in provider.default_dimensions.items()}

    # Where the provider keeps its state (it reads and clears these attributes only).
    per_thread: dict[str, Any] = {
        "metric_set": _PerThreadDict(dict),
        "dimension_set": _PerThreadDict(defaults),
        "metadata_set": _PerThreadDict(dict),
        "dimension_sets": _PerThreadList(),
    }
    saved = {name: getattr(provider, name) for name in per_thread}
    for name, value in per_thread.items():
        setattr(provider, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(provider, name, value)


def _without_metrics(handler: Any) -> Any:
    """No CloudWatch here: drop each invocation's metrics instead of printing them (EMF
    goes to stdout, which `--json` reserves for the report)."""
    from trainctl_core.observability import metrics

    def invoke(event: dict[str, Any], context: Any) -> Any:
        try:
            return handler(event, context)
        finally:
            metrics.clear_metrics()

    return invoke


class Dispatcher:
    """A thread that receives queued events and hands each to a handler invocation."""

    def __init__(
        self, sqs: Any, queues: Mapping[str, str], handlers: Mapping[str, Any], *, redeliver: bool = False
    ) -> None:
        self._sqs = sqs
        self._redeliver = redeliver  # EventBridge is at-least-once: hand every event over twice
        self._queues = dict(queues)
        self._handlers = dict(handlers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rehearse-dispatcher", daemon=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="rehearse-lambda")
        self.invocations: list[Invocation] = []
        self.parked: list[Invocation] = []
        self._lock = threading.Lock()

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            running = []
            for function, url in self._queues.items():
                try:
                    batch = self._sqs.receive_message(
                        QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["ApproximateReceiveCount"]
                    ).get("Messages", [])
                except Exception:
                    if self._stop.is_set():
                        return
                    logger.exception("receiving from %s failed", function)
                    continue
                # A message stays invisible while its invocation runs (the queues'
                # visibility timeout), so receiving goes on without waiting for these.
                running += [self._pool.submit(self._handle, function, url, message) for message in batch]
            if not running:
                self._stop.wait(0.05)

    def _handle(self, function: str, url: str, message: dict[str, Any]) -> None:
        try:
            self._deliver(function, url, message)
            if self._redeliver:
                self._invoke(function, json.loads(message["Body"]))
        except Exception:  # e.g. delete_message while moto stops: the loop goes on
            if not self._stop.is_set():
                logger.exception("delivering to %s failed", function)

    def _deliver(self, function: str, url: str, message: dict[str, Any]) -> None:
        event = json.loads(message["Body"])
        # moto's EventBridge -> SQS delivery drops `account`; AWS always sets it (the bus
        # owner), and the handlers' event models require it.
        event.setdefault("account", ACCOUNT)
        detail = event.get("detail") or {}
        invocation = Invocation(
            function=function,
            event_id=str(event.get("id")),
            detail_type=str(event.get("detail-type")),
            instance_id=detail.get("instance-id"),
            at=time.time(),
        )
        try:
            invocation.response = self._handlers[function](event, LambdaContext(function_name=function))
        except Exception as exc:
            invocation.error = f"{type(exc).__name__}: {exc}"
            logger.warning("%s failed on event %s: %s", function, invocation.event_id, invocation.error)
            receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
            with self._lock:
                self.invocations.append(invocation)
                if receives >= MAX_RECEIVES:
                    self.parked.append(invocation)
            if receives >= MAX_RECEIVES:
                self._sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            else:  # left on the queue, visible again soon: a retry
                self._sqs.change_message_visibility(
                    QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=RETRY_SECONDS
                )
            return
        with self._lock:
            self.invocations.append(invocation)
        self._sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    def _invoke(self, function: str, event: dict[str, Any]) -> None:
        """A redelivery of an event already handled (same id): must change nothing."""
        event.setdefault("account", ACCOUNT)
        invocation = Invocation(
            function, str(event.get("id")), str(event.get("detail-type")), None, time.time()
        )
        try:
            invocation.response = self._handlers[function](event, LambdaContext(function_name=function))
        except Exception as exc:
            invocation.error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.invocations.append(invocation)

    def snapshot(self) -> list[Invocation]:
        with self._lock:
            return list(self.invocations)

    def idle(self) -> bool:
        """No message waiting in any queue (approximately)."""
        for url in self._queues.values():
            attributes = self._sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
            if int(attributes["ApproximateNumberOfMessages"]) or int(
                attributes["ApproximateNumberOfMessagesNotVisible"]
            ):
                return False
        return True
