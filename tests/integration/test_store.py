"""JobStore's conditional writes against moto: every refused write says why, with the row
as it is now, and changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from tests.integration.conftest import INSTANCE, POOLS
from trainctl_core import jobs
from trainctl_core.errors import ConcurrentUpdate, JobAlreadyExists, Superseded
from trainctl_core.jobs import CheckpointRef, InterruptionReason, JobStatus, Transition, format_time
from trainctl_core.store import JobStore, StoreUnavailable

REPLACEMENT = "i-0bbbbbbbbbbbbbbbb"


def raw_item(env: Any, job_id: str) -> dict[str, Any]:
    return env.ddb.get_item(TableName="trainctl-jobs", Key={"pk": {"S": f"JOB#{job_id}"}})["Item"]


def replace(env: Any, job: jobs.Job) -> jobs.Job:
    """Record the loss of the current instance and put a replacement on the row."""
    assert job.instance_id is not None
    now = jobs.utcnow()
    job = env.store.apply(
        jobs.mark_interrupted(
            job, instance_id=job.instance_id, reason=InterruptionReason.SPOT_WARNING, now=now
        )
    )
    return env.store.apply(
        jobs.mark_launching(
            job,
            instance_id=REPLACEMENT,
            pool=jobs.CapacityPool(**POOLS[1]).label,
            resume_point=jobs.ResumePoint(kind=jobs.CheckpointKind.NONE),
            now=now,
        )
    )


# --- create ------------------------------------------------------------------------------------


def test_creating_a_job_that_exists_is_refused_and_keeps_the_row(env) -> None:
    existing = env.add_job()
    before = raw_item(env, env.job_id)
    again = jobs.new_job(env.job_id, existing.spec.model_copy(update={"name": "someone else's"}))

    with pytest.raises(JobAlreadyExists) as info:
        env.store.create(again)

    assert info.value.job_id == env.job_id
    assert raw_item(env, env.job_id) == before


# --- apply: each part of the condition -----------------------------------------------------------


def test_a_transition_from_an_old_version_is_refused_with_the_current_row(env) -> None:
    # Given a writer that read the row, and another write that landed since
    seen = env.add_job()
    assert seen.instance_id is not None
    current = env.store.apply(jobs.mark_succeeded(seen, instance_id=seen.instance_id, now=jobs.utcnow()))

    # When the first writer writes what it computed from its (old) view
    with pytest.raises(ConcurrentUpdate) as info:
        env.store.apply(jobs.mark_cancelled(seen, now=jobs.utcnow()))

    # Then it is told, with the row as it is now, so it can decide again
    assert info.value.current == current
    assert env.store.get(env.job_id) == current


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expected_version", 99),
        ("expected_status", JobStatus.LAUNCHING),
        ("expected_instance_id", "i-0fffffffffffffff0"),
        ("expected_instance_id", None),  # "no instance yet" on a row that has one
    ],
)
def test_each_part_of_the_condition_is_checked(env, field: str, value: Any) -> None:
    # Given a transition that matches the row in everything but one expectation
    row = env.add_job()
    honest = jobs.mark_cancelled(row, now=jobs.utcnow())
    forged = Transition.model_validate({**honest.model_dump(), field: value})

    with pytest.raises(ConcurrentUpdate) as info:
        env.store.apply(forged)

    assert info.value.current == row
    assert env.store.get(env.job_id) == row
    # and the honest one still goes through
    assert env.store.apply(honest).status == JobStatus.CANCELLED


def test_a_transition_for_a_deleted_row_carries_no_current_row(env) -> None:
    row = env.add_job()
    env.ddb.delete_item(TableName="trainctl-jobs", Key={"pk": {"S": f"JOB#{env.job_id}"}})

    with pytest.raises(ConcurrentUpdate) as info:
        env.store.apply(jobs.mark_cancelled(row, now=jobs.utcnow()))

    assert info.value.current is None


# --- find_by_instance ------------------------------------------------------------------------------


def test_find_by_instance_only_knows_the_current_instance(env) -> None:
    job = replace(env, env.add_job())

    assert env.store.find_by_instance(INSTANCE) is None
    found = env.store.find_by_instance(REPLACEMENT)
    assert found is not None and found == job


def test_the_replaced_instance_leads_to_its_job_as_a_past_instance(env) -> None:
    # Given a job that lost INSTANCE and moved on to REPLACEMENT
    job = replace(env, env.add_job())

    # Then INSTANCE finds the job through its last recorded loss, REPLACEMENT does not
    # (it is current), and an instance the job never lost finds nothing
    found = env.store.find_by_interrupted_instance(INSTANCE)
    assert found is not None and found == job and found.interrupted_instance_id == INSTANCE
    assert env.store.find_by_interrupted_instance(REPLACEMENT) is None
    assert env.store.find_by_interrupted_instance("i-0ccccccccccccccc0") is None


def test_an_interrupted_instance_not_yet_replaced_is_current_not_past(env) -> None:
    job = env.add_job()
    env.store.apply(
        jobs.mark_interrupted(
            job, instance_id=INSTANCE, reason=InterruptionReason.SPOT_WARNING, now=jobs.utcnow()
        )
    )

    assert env.store.find_by_interrupted_instance(INSTANCE) is None
    current = env.store.find_by_instance(INSTANCE)
    assert current is not None and current.status == JobStatus.INTERRUPTED


class StaleIndex:
    """A DynamoDB client whose by-instance index still answers with the job's old
    instance (the index is eventually consistent on AWS; moto updates it at once)."""

    def __init__(self, client: Any, job_id: str) -> None:
        self._client = client
        self._job_id = job_id
        self.queries = 0

    def query(self, **kwargs: Any) -> dict[str, Any]:
        self.queries += 1
        return {"Items": [{"pk": {"S": f"JOB#{self._job_id}"}}]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_find_by_instance_drops_a_stale_index_hit(env) -> None:
    # Given the index still names the old instance for a job that moved on
    replace(env, env.add_job())
    stale = StaleIndex(env.ddb, env.job_id)
    store = JobStore(stale, "trainctl-jobs")

    # Then the consistent re-read of the row wins: the old instance runs no job
    assert store.find_by_instance(INSTANCE) is None
    assert stale.queries == 1
    found = store.find_by_instance(REPLACEMENT)
    assert found is not None and found.instance_id == REPLACEMENT


# --- fenced agent writes ---------------------------------------------------------------------------


def test_a_checkpoint_from_a_replaced_attempt_is_superseded(env) -> None:
    replace(env, env.add_job())
    late = CheckpointRef(step=500, prefix=f"{env.job_id}/ckpt/500/", attempt=0, created_at=jobs.utcnow())

    with pytest.raises(Superseded) as info:
        env.store.record_checkpoint(env.job_id, instance_id=INSTANCE, attempt=0, checkpoint=late, final=True)

    assert info.value.current is not None and info.value.current.instance_id == REPLACEMENT
    after = env.store.get(env.job_id)
    assert after.last_checkpoint is None and after.final_checkpoint is None


def _checkpoint(env: Any, step: int, attempt: int) -> CheckpointRef:
    return CheckpointRef(
        step=step,
        prefix=f"{env.job_id}/ckpt/{step:012d}-a{attempt}/",
        attempt=attempt,
        created_at=jobs.utcnow(),
    )


def _named(ref: CheckpointRef | None) -> tuple[int, int, str] | None:
    return None if ref is None else (ref.step, ref.attempt, ref.prefix)


def test_a_replacement_records_checkpoints_below_the_previous_attempts_step(env) -> None:
    # Given attempt 0 recorded step 900, and the replacement restored an older one (fallback)
    env.add_job()
    env.store.record_checkpoint(
        env.job_id, instance_id=INSTANCE, attempt=0, checkpoint=_checkpoint(env, 900, 0), final=False
    )
    replace(env, env.store.get(env.job_id))
    # When attempt 1 records its own checkpoints, at lower steps
    mine = _checkpoint(env, 300, 1)
    env.store.record_checkpoint(env.job_id, instance_id=REPLACEMENT, attempt=1, checkpoint=mine, final=False)
    final = _checkpoint(env, 320, 1)
    row = env.store.record_checkpoint(
        env.job_id, instance_id=REPLACEMENT, attempt=1, checkpoint=final, final=True
    )
    # Then they are the row's newest durable state, final one included
    job = env.store.get(env.job_id)
    assert _named(job.last_checkpoint) == _named(job.final_checkpoint) == _named(final)
    assert row["final_checkpoint"]["attempt"] == 1
    # But within attempt 1 the step still never goes back
    with pytest.raises(Superseded) as info:
        env.store.record_checkpoint(
            env.job_id, instance_id=REPLACEMENT, attempt=1, checkpoint=mine, final=False
        )
    assert info.value.current is not None and info.value.current.instance_id == REPLACEMENT
    assert _named(env.store.get(env.job_id).last_checkpoint) == _named(final)


class FailingUpdates:
    """The table's client, failing every update_item with `error` (botocore's retries spent)."""

    def __init__(self, client: Any, error: Exception) -> None:
        self._client = client
        self._error = error

    def update_item(self, **kwargs: Any) -> Any:
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "UpdateItem",
    )


@pytest.mark.parametrize(
    "error",
    [
        _client_error("ProvisionedThroughputExceededException", 400),
        _client_error("ThrottlingException", 400),
        _client_error("InternalServerError", 500),
        EndpointConnectionError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com"),
        ReadTimeoutError(endpoint_url="https://dynamodb.us-east-1.amazonaws.com"),
    ],
)
def test_an_agent_write_the_table_could_not_take_now_is_store_unavailable(env, error: Exception) -> None:
    env.add_job()
    store = JobStore(FailingUpdates(env.ddb, error), "trainctl-jobs")
    with pytest.raises(StoreUnavailable):
        store.record_checkpoint(
            env.job_id, instance_id=INSTANCE, attempt=0, checkpoint=_checkpoint(env, 10, 0), final=True
        )
    with pytest.raises(StoreUnavailable):
        store.heartbeat(env.job_id, instance_id=INSTANCE, attempt=0, step=10)


def test_an_agent_write_refused_for_good_is_not_store_unavailable(env) -> None:
    env.add_job()
    store = JobStore(FailingUpdates(env.ddb, _client_error("ValidationException", 400)), "trainctl-jobs")
    with pytest.raises(ClientError) as info:
        store.heartbeat(env.job_id, instance_id=INSTANCE, attempt=0, step=10)
    assert not isinstance(info.value, StoreUnavailable)


# --- accrued cost -------------------------------------------------------------------------------


def test_cost_accrues_exactly_once_per_window(env) -> None:
    env.add_job()
    t0 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    t1, t2 = t0 + timedelta(minutes=1), t0 + timedelta(minutes=2)
    accrue = partial(env.store.accrue_cost, env.job_id, instance_id=INSTANCE, attempt=0)
    # The attempt's first window, then the same write again (a retried request that had landed)
    assert accrue(usd=0.25, since=None, until=t1)["cost_usd"] == 0.25
    again = accrue(usd=0.25, since=None, until=t1)
    assert again["cost_usd"] == 0.25 and again["cost_accrued_at"] == format_time(t1)
    # The next window, from the row's mark; then a stale one (mark moved on): nothing added
    assert accrue(usd=0.5, since=t1, until=t2)["cost_usd"] == 0.75
    stale = accrue(usd=0.5, since=t1, until=t2 + timedelta(minutes=1))
    assert stale["cost_usd"] == 0.75 and stale["cost_accrued_at"] == format_time(t2)
    assert env.store.get(env.job_id).cost_usd == 0.75


def test_a_replacement_accrues_on_top_of_the_previous_attempts_cost(env) -> None:
    env.add_job()
    t0 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    env.store.accrue_cost(env.job_id, instance_id=INSTANCE, attempt=0, usd=1.5, since=None, until=t0)
    replace(env, env.store.get(env.job_id))
    # The old attempt can no longer add to it
    with pytest.raises(Superseded):
        env.store.accrue_cost(
            env.job_id, instance_id=INSTANCE, attempt=0, usd=9.0, since=t0, until=t0 + timedelta(hours=1)
        )
    # The replacement starts its own mark and adds to the job's total
    row = env.store.accrue_cost(
        env.job_id, instance_id=REPLACEMENT, attempt=1, usd=0.5, since=None, until=t0 + timedelta(minutes=5)
    )
    assert row["cost_usd"] == 2.0 and row["cost_accrued_attempt"] == 1
