"""Ship the agent's log records and the training child's output to CloudWatch Logs.

One stream per `<job>/<attempt>/<instance>` in the stack's agent log group (what
`trainctl logs JOB` reads). Writers (the output pump, logging handlers) only append to a
bounded in-memory buffer under a lock; one background thread does all network I/O. So a
slow or unreachable CloudWatch never blocks or crashes training: the buffer keeps the
newest events, drops the oldest with a counted warning, and ships the rest once the
endpoint answers again.

PutLogEvents limits respected per batch: at most 10,000 events and 1,048,576 bytes (UTF-8
message bytes + 26 per event), chronological order, a span under 24 h; single events are
cut to 256 KiB.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger("trainctl.agent.logship")

MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD_BYTES = 26
MAX_EVENT_BYTES = 262_144  # message + overhead
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000 - 60_000  # a minute's margin under the 24 h limit
PENDING_ATTEMPT = "pending"  # stream segment when the agent never learned its attempt

# Short timeouts and one retry: a put that cannot get through is retried by the shipper's
# own loop on the next interval (events stay buffered), so botocore's retries add nothing.
CLIENT_CONFIG = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})


def stream_name(job_id: str, attempt: int | str, instance_id: str) -> str:
    """`<job>/<attempt>/<instance>`: `trainctl logs JOB [--attempt N]` lists by this prefix."""
    return f"{job_id}/{attempt}/{instance_id}"


def make_client(region: str | None = None) -> Any:
    """A CloudWatch Logs client for the shipper (endpoint from the standard AWS variables)."""
    import boto3

    return boto3.session.Session().client("logs", region_name=region, config=CLIENT_CONFIG)


@dataclass(frozen=True)
class _Event:
    seq: int
    timestamp: int  # ms since the epoch
    message: str
    size: int  # bytes it counts against a batch (UTF-8 + overhead)


class LogShipper:
    """Buffer log lines and put them to one CloudWatch Logs stream from a background thread.

    `bind_attempt` names the stream (events written before that wait in the buffer);
    `flush` waits, at most `flush_timeout` seconds, until everything written before the
    call is shipped (or dropped); `close` flushes and stops the thread.
    """

    def __init__(
        self,
        client: Any,
        log_group: str,
        *,
        job_id: str,
        instance_id: str,
        interval: float = 2.0,
        flush_timeout: float = 5.0,
        max_backoff: float = 30.0,
        max_buffered_events: int = 100_000,
        max_buffered_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not log_group:
            raise ValueError("log_group must name a CloudWatch Logs group")
        if max_buffered_events < 1 or max_buffered_bytes < MAX_EVENT_BYTES:
            raise ValueError(
                f"the buffer must hold at least one event of {MAX_EVENT_BYTES} bytes "
                f"(got {max_buffered_events} events, {max_buffered_bytes} bytes)"
            )
        self.client = client
        self.log_group = log_group
        self.job_id = job_id
        self.instance_id = instance_id
        self.interval = interval
        self.flush_timeout = flush_timeout
        self.max_backoff = max_backoff
        self.max_buffered_events = max_buffered_events
        self.max_buffered_bytes = max_buffered_bytes
        self.clock = clock
        self.stream: str | None = None
        # Counters a caller (and the tests) can read; written under the lock.
        self.shipped = 0
        self.dropped = 0
        self.rejected = 0
        self._buffer: collections.deque[_Event] = collections.deque()
        self._buffered_bytes = 0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0  # last sequence number written
        self._settled = 0  # every event with seq <= this is shipped, dropped or rejected
        self._last_timestamp = 0
        self._dropped_unreported = 0
        self._stream_ready = False
        self._failures = 0
        self._outage_logged = False
        self._thread: threading.Thread | None = None
        self._handler: logging.Handler | None = None
        self._handler_logger: logging.Logger | None = None

    # --- writers (never block on the network) ---------------------------------------------

    def write(self, message: str, timestamp: float | None = None) -> None:
        """Buffer one line (a trailing newline is dropped; empty lines are skipped)."""
        message = message.rstrip("\r\n")
        if not message:
            return  # CloudWatch Logs rejects empty messages
        data = message.encode("utf-8", errors="replace")
        limit = MAX_EVENT_BYTES - EVENT_OVERHEAD_BYTES
        if len(data) > limit:
            message = data[:limit].decode("utf-8", errors="ignore")
            data = message.encode("utf-8")
        moment = int((self.clock() if timestamp is None else timestamp) * 1000)
        with self._lock:
            # Never earlier than the previous event: batches stay chronological even when
            # the wall clock steps back or a log record's creation time precedes a line.
            moment = max(moment, self._last_timestamp)
            self._last_timestamp = moment
            self._seq += 1
            event = _Event(self._seq, moment, message, len(data) + EVENT_OVERHEAD_BYTES)
            self._buffer.append(event)
            self._buffered_bytes += event.size
            self._enforce_bound()

    def bind_attempt(self, attempt: int | str) -> None:
        """Name the stream `<job>/<attempt>/<instance>`; buffered events ship from now on."""
        with self._lock:
            name = stream_name(self.job_id, attempt, self.instance_id)
            if name != self.stream:
                self.stream, self._stream_ready = name, False
        self._wake.set()

    def attach(self, logger_name: str = "trainctl", level: int = logging.INFO) -> logging.Handler:
        """Also ship the records of `logger_name` (and its children), formatted like the console."""
        handler = _ShippingHandler(self, level)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        target = logging.getLogger(logger_name)
        target.addHandler(handler)
        self._handler, self._handler_logger = handler, target
        return handler

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> LogShipper:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trainctl-logship", daemon=True)
            self._thread.start()
        return self

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event written so far is settled; False if `timeout` ran out first.

        Events are settled once shipped, rejected by CloudWatch, or dropped from a full
        buffer. Without a running thread (or a stream) nothing ships: returns False at once
        if anything is pending.
        """
        wait = self.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._lock:
            target = self._seq
            if self._settled >= target:
                return True
            if self._thread is None or not self._thread.is_alive():
                return False
        self._wake.set()
        with self._done:
            while self._settled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
            return True

    def close(self, timeout: float | None = None) -> bool:
        """Final flush, then stop the thread; True if everything was shipped or settled."""
        if self._handler is not None and self._handler_logger is not None:
            self._handler_logger.removeHandler(self._handler)
            self._handler = self._handler_logger = None
        if self.stream is None:
            # The agent exited before it learned its attempt (e.g. no resume point): keep
            # the reason, under a stream `trainctl logs JOB` still lists.
            self.bind_attempt(PENDING_ATTEMPT)
        flushed = self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A put stuck on an unreachable endpoint must not hold the agent's exit.
            self._thread.join(timeout=1.0)
        with self._lock:
            if self._buffer:
                logger.warning(
                    "%d log events not shipped to %s (CloudWatch Logs unreachable)",
                    len(self._buffer),
                    self.log_group,
                )
        return flushed

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    # --- the shipping thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._delay())
            self._wake.clear()
            try:
                self._ship_available()
            except Exception:  # never let a bug in shipping kill the thread silently
                logger.exception("log shipping failed")
                self._failures += 1

    def _delay(self) -> float:
        if self._failures == 0:
            return self.interval
        return min(self.interval * 2**self._failures, self.max_backoff)

    def _ship_available(self) -> None:
        while True:
            with self._lock:
                stream = self.stream
                batch = self._take_batch() if stream is not None else []
                notice = self._dropped_unreported
            if stream is None or not batch:
                return
            events = [{"timestamp": e.timestamp, "message": e.message} for e in batch]
            if notice:
                # The notice takes the first event's time so the batch stays in order.
                text = f"trainctl: dropped {notice} older log events while CloudWatch Logs was unreachable"
                events.insert(0, {"timestamp": batch[0].timestamp, "message": text})
            refused = self._put(stream, events)
            if refused is None:
                with self._lock:
                    self._restore(batch)
                return
            with self._done:
                # Refusals count against the batch's own events first (the notice is one).
                refused = min(refused, len(batch))
                self.rejected += refused
                self.shipped += len(batch) - refused
                self._dropped_unreported -= notice
                self._settled = max(self._settled, batch[-1].seq)
                self._done.notify_all()
            if notice:
                logger.warning("dropped %d log events while CloudWatch Logs was unreachable", notice)

    def _take_batch(self) -> list[_Event]:
        """Pop the oldest events that fit one PutLogEvents call (the lock is held)."""
        batch: list[_Event] = []
        size = EVENT_OVERHEAD_BYTES + 200 if self._dropped_unreported else 0  # room for the notice
        count = 1 if self._dropped_unreported else 0
        while self._buffer:
            event = self._buffer[0]
            if count + 1 > MAX_BATCH_EVENTS or size + event.size > MAX_BATCH_BYTES:
                break
            if batch and event.timestamp - batch[0].timestamp > MAX_BATCH_SPAN_MS:
                break
            batch.append(self._buffer.popleft())
            self._buffered_bytes -= event.size
            size += event.size
            count += 1
        return batch

    def _restore(self, batch: list[_Event]) -> None:
        """Put an unshipped batch back at the head (the lock is held), then re-bound."""
        self._buffer.extendleft(reversed(batch))
        self._buffered_bytes += sum(e.size for e in batch)
        self._enforce_bound()

    def _enforce_bound(self) -> None:
        dropped = 0
        while self._buffer and (
            len(self._buffer) > self.max_buffered_events or self._buffered_bytes > self.max_buffered_bytes
        ):
            event = self._buffer.popleft()
            self._buffered_bytes -= event.size
            self._settled = max(self._settled, event.seq)
            dropped += 1
        if dropped:
            self.dropped += dropped
            self._dropped_unreported += dropped
            self._done.notify_all()

    def _put(self, stream: str, events: list[dict[str, Any]]) -> int | None:
        """One PutLogEvents call (creating the stream when needed).

        Returns how many events CloudWatch refused (they are settled, never retried), or
        None when the call did not get through (the batch goes back to the buffer).
        """
        try:
            if not self._stream_ready:
                self._create_stream(stream)
            try:
                response = self._put_events(stream, events)
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise
                # The stream went away (or was never created by us): create it, try once more.
                self._create_stream(stream)
                response = self._put_events(stream, events)
        except ClientError as exc:
            if _code(exc) == "InvalidParameterException":
                # A batch CloudWatch will never accept must not wedge the queue behind it.
                logger.warning("CloudWatch Logs refused %d log events: %s", len(events), exc)
                self._failures = 0
                return len(events)
            self._on_failure(exc)
            return None
        except BotoCoreError as exc:  # unreachable endpoint, timeouts, credentials
            self._on_failure(exc)
            return None
        if self._outage_logged:
            logger.info("CloudWatch Logs reachable again: shipping to %s", stream)
        self._failures, self._outage_logged = 0, False
        rejected = _rejected_count(response.get("rejectedLogEventsInfo"), len(events))
        if rejected:
            logger.warning("CloudWatch Logs rejected %d log events (too old or too new)", rejected)
        return rejected

    def _put_events(self, stream: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        response: dict[str, Any] = self.client.put_log_events(
            logGroupName=self.log_group, logStreamName=stream, logEvents=events
        )
        return response

    def _create_stream(self, stream: str) -> None:
        try:
            self.client.create_log_stream(logGroupName=self.log_group, logStreamName=stream)
        except ClientError as exc:
            if _code(exc) != "ResourceAlreadyExistsException":
                raise
        self._stream_ready = True

    def _on_failure(self, exc: Exception) -> None:
        self._failures += 1
        if not self._outage_logged:
            # Once per outage, not once per retry: the agent's console stays readable.
            logger.warning(
                "cannot ship logs to %s (%s); buffering up to %d events and retrying",
                self.log_group,
                exc,
                self.max_buffered_events,
            )
            self._outage_logged = True


class _ShippingHandler(logging.Handler):
    """A logging handler that writes formatted records into the shipper's buffer."""

    def __init__(self, shipper: LogShipper, level: int) -> None:
        super().__init__(level)
        self.shipper = shipper

    def filter(self, record: logging.LogRecord) -> bool:
        # The shipper's own warnings stay local: shipping "cannot ship" would feed the outage.
        return record.name != logger.name and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.shipper.write(self.format(record), timestamp=record.created)
        except Exception:
            self.handleError(record)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _rejected_count(info: dict[str, Any] | None, total: int) -> int:
    """How many events `rejectedLogEventsInfo` names (indexes are inclusive/exclusive per key)."""
    if not info:
        return 0
    rejected: set[int] = set()
    if "tooOldLogEventEndIndex" in info:
        rejected.update(range(int(info["tooOldLogEventEndIndex"]) + 1))
    if "expiredLogEventEndIndex" in info:
        rejected.update(range(int(info["expiredLogEventEndIndex"]) + 1))
    if "tooNewLogEventStartIndex" in info:
        rejected.update(range(int(info["tooNewLogEventStartIndex"]), total))
    return len(rejected)


__all__ = ["LogShipper", "make_client", "stream_name"]
