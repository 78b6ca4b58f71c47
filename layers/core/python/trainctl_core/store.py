"""DynamoDB adapter for the jobs table: the only module here that talks to DynamoDB.

Every status change is one `UpdateItem` conditioned on the version, status and instance
the writer saw (see `jobs.Transition`), so concurrent writers cannot both win. Agent
writes (heartbeats, checkpoints, accrued cost) are *fenced*: conditioned on the writer
still being the job's current (instance, attempt), and they do not bump the version, so
they never make a control-plane transition fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, cast

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel

# The errors this adapter raises are defined boto3-free (domain code catches them) and
# re-exported here for callers that think of them as the store's.
from trainctl_core.errors import (
    ConcurrentUpdate,
    JobAlreadyExists,
    JobNotFound,
    StoreUnavailable,
    Superseded,
)
from trainctl_core.jobs import CheckpointRef, Job, Transition, format_time
from trainctl_core.settings import (
    JOBS_BY_INSTANCE_INDEX,
    JOBS_BY_INTERRUPTED_INSTANCE_INDEX,
    JOBS_INSTANCE_ATTRIBUTE,
    JOBS_INTERRUPTED_INSTANCE_ATTRIBUTE,
    JOBS_PARTITION_KEY,
)

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def job_key(job_id: str) -> dict[str, Any]:
    return {JOBS_PARTITION_KEY: {"S": f"JOB#{job_id}"}}


def to_attribute(value: Any) -> dict[str, Any]:
    """Serialise a domain value (models, datetimes, enums, floats) to a DynamoDB attribute."""
    return cast(dict[str, Any], _serializer.serialize(_plain(value)))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump(mode="python").items() if v is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def _python(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_python(v) for v in value]
    return value


def item_to_job(item: dict[str, Any]) -> Job:
    data = {k: _python(_deserializer.deserialize(v)) for k, v in item.items()}
    data.pop(JOBS_PARTITION_KEY, None)
    known = set(Job.model_fields)
    return Job.model_validate({k: v for k, v in data.items() if k in known})


def job_to_item(job: Job) -> dict[str, Any]:
    item = {k: to_attribute(v) for k, v in _plain(job).items()}
    return {**job_key(job.job_id), **item}


class JobStore:
    """Reads and conditional writes of job rows."""

    def __init__(self, client: Any, table_name: str) -> None:
        self._ddb = client
        self._table = table_name

    # --- reads -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        response = self._ddb.get_item(TableName=self._table, Key=job_key(job_id), ConsistentRead=True)
        if "Item" not in response:
            raise JobNotFound(job_id)
        return item_to_job(response["Item"])

    def raw(self, job_id: str) -> dict[str, Any]:
        """The row with the attributes the model does not carry (e.g. the task token)."""
        response = self._ddb.get_item(TableName=self._table, Key=job_key(job_id), ConsistentRead=True)
        if "Item" not in response:
            raise JobNotFound(job_id)
        return {k: _python(_deserializer.deserialize(v)) for k, v in response["Item"].items()}

    def find_by_instance(self, instance_id: str) -> Job | None:
        """The job whose *current* instance is `instance_id`, if any.

        The index is eventually consistent, so the hit is re-read consistently and
        dropped if the row has moved on to another instance meanwhile.
        """
        return self._find(
            JOBS_BY_INSTANCE_INDEX,
            JOBS_INSTANCE_ATTRIBUTE,
            instance_id,
            lambda job: job.instance_id == instance_id,
        )

    def find_by_interrupted_instance(self, instance_id: str) -> Job | None:
        """The job whose last recorded loss was `instance_id` and that has moved on from
        it (a replacement, or the job ended), if any: events about it are stale."""
        return self._find(
            JOBS_BY_INTERRUPTED_INSTANCE_INDEX,
            JOBS_INTERRUPTED_INSTANCE_ATTRIBUTE,
            instance_id,
            lambda job: job.interrupted_instance_id == instance_id and job.instance_id != instance_id,
        )

    def _find(
        self, index: str, attribute: str, instance_id: str, matches: Callable[[Job], bool]
    ) -> Job | None:
        response = self._ddb.query(
            TableName=self._table,
            IndexName=index,
            KeyConditionExpression="#i = :i",
            ExpressionAttributeNames={"#i": attribute, "#pk": JOBS_PARTITION_KEY},
            ExpressionAttributeValues={":i": {"S": instance_id}},
            # The index projects keys only (cheap to keep): the base key names the job.
            ProjectionExpression="#pk",
        )
        for item in response.get("Items", []):
            job = self._get_or_none(item[JOBS_PARTITION_KEY]["S"].removeprefix("JOB#"))
            if job is not None and matches(job):
                return job
        return None

    def scan(self) -> Iterator[Job]:
        paginator = self._ddb.get_paginator("scan")
        for page in paginator.paginate(TableName=self._table, ConsistentRead=True):
            for item in page.get("Items", []):
                if item.get(JOBS_PARTITION_KEY, {}).get("S", "").startswith("JOB#"):
                    yield item_to_job(item)

    # --- writes ------------------------------------------------------------------------

    def create(self, job: Job) -> Job:
        try:
            self._ddb.put_item(
                TableName=self._table,
                Item=job_to_item(job),
                ConditionExpression="attribute_not_exists(#pk)",
                ExpressionAttributeNames={"#pk": JOBS_PARTITION_KEY},
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise JobAlreadyExists(job.job_id) from exc
            raise
        return job

    def apply(self, transition: Transition) -> Job:
        """Write `transition` if the row is still as the writer saw it; return the new row."""
        names: dict[str, str] = {"#version": "version", "#status": "status", "#inst": "instance_id"}
        values: dict[str, Any] = {
            ":expected_version": {"N": str(transition.expected_version)},
            ":expected_status": {"S": transition.expected_status.value},
            ":next_version": {"N": str(transition.expected_version + 1)},
        }
        sets = ["#version = :next_version"]
        for index, (name, value) in enumerate(transition.changes.items()):
            names[f"#c{index}"] = name
            if value is None:
                continue
            values[f":c{index}"] = to_attribute(value)
            sets.append(f"#c{index} = :c{index}")
        removes = [f"#c{i}" for i, v in enumerate(transition.changes.values()) if v is None]
        if transition.append:
            values[":empty"] = {"L": []}
        for index, (name, items) in enumerate(transition.append.items()):
            names[f"#a{index}"] = name
            values[f":a{index}"] = to_attribute(list(items))
            sets.append(f"#a{index} = list_append(if_not_exists(#a{index}, :empty), :a{index})")
        condition = "#version = :expected_version AND #status = :expected_status"
        if transition.expected_instance_id is None:
            condition += " AND attribute_not_exists(#inst)"
        else:
            values[":expected_instance"] = {"S": transition.expected_instance_id}
            condition += " AND #inst = :expected_instance"
        expression = "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        try:
            response = self._ddb.update_item(
                TableName=self._table,
                Key=job_key(transition.job_id),
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise ConcurrentUpdate(transition.job_id, self._get_or_none(transition.job_id)) from exc
            raise
        return item_to_job(response["Attributes"])

    def record_checkpoint(
        self,
        job_id: str,
        *,
        instance_id: str,
        attempt: int,
        checkpoint: CheckpointRef,
        final: bool,
    ) -> dict[str, Any]:
        """Record a durable checkpoint written by `instance_id` during `attempt` (fenced).

        `final=True` marks it as this attempt's final (on-notice) checkpoint: the resume
        workflow's handshake waits for it. Returns the row as written (raw, including the
        workflow's `task_token` and `task_token_attempt` if it stored one) so the caller
        can complete the handshake; raises `Superseded` if the writer is no longer current.
        """
        sets = "last_checkpoint = :ckpt, updated_at = :now"
        if final:
            sets += ", final_checkpoint = :ckpt"
        return self._fenced_update(
            job_id,
            instance_id=instance_id,
            attempt=attempt,
            expression="SET " + sets,
            values={":ckpt": to_attribute(checkpoint), ":now": to_attribute(datetime.now(UTC))},
            # A late upload from an older checkpoint of this attempt must never replace a
            # newer one. A previous attempt's checkpoint never blocks this attempt's: after
            # a fallback restore (the resume point was corrupt, an older one was used) this
            # attempt's steps are below the recorded one, and they are still the newest
            # durable state of the job.
            extra_condition=(
                "(attribute_not_exists(last_checkpoint) OR last_checkpoint.attempt < :attempt"
                " OR last_checkpoint.step <= :step)"
            ),
            extra_values={":step": {"N": str(checkpoint.step)}},
        )

    def heartbeat(
        self,
        job_id: str,
        *,
        instance_id: str,
        attempt: int,
        step: int,
        steps_per_second: float | None = None,
    ) -> dict[str, Any]:
        """Progress report from the agent (fenced; does not bump the version)."""
        values: dict[str, Any] = {
            ":step": {"N": str(step)},
            ":now": to_attribute(datetime.now(UTC)),
        }
        sets = "heartbeat_step = :step, heartbeat_at = :now"
        if steps_per_second is not None:
            values[":sps"] = to_attribute(float(steps_per_second))
            sets += ", steps_per_second = :sps"
        return self._fenced_update(
            job_id, instance_id=instance_id, attempt=attempt, expression="SET " + sets, values=values
        )

    def accrue_cost(
        self,
        job_id: str,
        *,
        instance_id: str,
        attempt: int,
        usd: float,
        since: datetime | None,
        until: datetime,
    ) -> dict[str, Any]:
        """Add `usd`, what `attempt` cost from `since` to `until`, to the row's `cost_usd`.

        Fenced like every agent write, and exactly once: the row keeps the attempt's
        accrual mark (`cost_accrued_attempt`, `cost_accrued_at`), and the write needs it
        to still be `since` (None: this attempt has accrued nothing yet) and moves it to
        `until`. A write whose mark has moved on (a retried request that had landed, a
        second agent of the same attempt) adds nothing and returns the row as it is, so
        the caller continues from the row's mark. Raises `Superseded` if the writer is no
        longer current. `until` is stored at millisecond precision: pass such a moment.
        """
        if since is None:
            mark = "(attribute_not_exists(cost_accrued_attempt) OR cost_accrued_attempt <> :attempt)"
            mark_values: dict[str, Any] = {}
        else:
            mark = "(cost_accrued_attempt = :attempt AND cost_accrued_at = :since)"
            mark_values = {":since": {"S": format_time(since)}}
        try:
            return self._fenced_update(
                job_id,
                instance_id=instance_id,
                attempt=attempt,
                expression="SET cost_accrued_at = :until, cost_accrued_attempt = :attempt ADD cost_usd :usd",
                values={":until": {"S": format_time(until)}, ":usd": to_attribute(float(usd))},
                extra_condition=mark,
                extra_values=mark_values,
            )
        except Superseded as exc:
            current = exc.current
            if current is not None and current.instance_id == instance_id and current.attempt == attempt:
                return self.raw(job_id)  # still current: only the mark had moved
            raise

    def _fenced_update(
        self,
        job_id: str,
        *,
        instance_id: str,
        attempt: int,
        expression: str,
        values: dict[str, Any],
        extra_condition: str | None = None,
        extra_values: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        condition = "instance_id = :me AND attempt = :attempt"
        if extra_condition:
            condition += " AND " + extra_condition
        all_values = {
            **values,
            **(extra_values or {}),
            ":me": {"S": instance_id},
            ":attempt": {"N": str(attempt)},
        }
        try:
            response = self._ddb.update_item(
                TableName=self._table,
                Key=job_key(job_id),
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeValues=all_values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise Superseded(job_id, instance_id, attempt, self._get_or_none(job_id)) from exc
            if _is_transient(exc):
                raise StoreUnavailable(job_id, _error_code(exc)) from exc
            raise
        except (BotoConnectionError, HTTPClientError) as exc:
            raise StoreUnavailable(job_id, type(exc).__name__) from exc
        return {k: _python(_deserializer.deserialize(v)) for k, v in response["Attributes"].items()}

    def _get_or_none(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None


def _is_condition_failure(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


# Refusals that say "not now" rather than "never": throttling and the service's own
# trouble. (Validation, access and condition failures repeat on every try.)
_TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "ThrottlingException",
        "Throttling",
        "LimitExceededException",
        "TransactionConflictException",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))


def _is_transient(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(exc) in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
