"""JobStore's conditional writes against moto: every refused write says why, with the row
as it is now, and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import INSTANCE, POOLS
from trainctl_core import jobs
from trainctl_core.errors import ConcurrentUpdate, JobAlreadyExists, Superseded
from trainctl_core.jobs import CheckpointRef, InterruptionReason, JobStatus, Transition
from trainctl_core.store import JobStore

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
