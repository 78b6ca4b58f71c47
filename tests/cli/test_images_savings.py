"""build / push behind a fake Docker daemon, savings against moto's EC2, and --help."""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from docker.errors import DockerException, ImageNotFound

from tests.cli.conftest import Cli, Stack
from trainctl.commands import costs, images
from trainctl.commands import stack as stack_mod
from trainctl_core import jobs

HELP_SNAPSHOT = Path(__file__).with_name("help.txt")

# --- a fake Docker daemon ---------------------------------------------------------------------


class FakeImage:
    def __init__(self, ref: str) -> None:
        self.id = "sha256:" + "ab" * 32
        self.ref = ref
        self.tags: list[str] = [ref]

    def tag(self, repository: str, tag: str) -> bool:
        self.tags.append(f"{repository}:{tag}")
        return True


class FakeImages:
    def __init__(self, daemon: FakeDocker) -> None:
        self.daemon = daemon

    def build(self, **kwargs: Any) -> tuple[FakeImage, list[dict[str, str]]]:
        self.daemon.builds.append(kwargs)
        context = Path(kwargs["path"])
        assert (context / kwargs["dockerfile"]).is_file(), "the daemon gets a Dockerfile inside its context"
        image = FakeImage(kwargs["tag"])
        self.daemon.store[kwargs["tag"]] = image
        return image, [
            {"stream": "Step 1/1 : FROM python:3.11-slim\n"},
            {"stream": "Successfully built abab\n"},
        ]

    def get(self, ref: str) -> FakeImage:
        if ref not in self.daemon.store:
            raise ImageNotFound(f"No such image: {ref}")
        return self.daemon.store[ref]

    def push(self, repository: str, tag: str, stream: bool, decode: bool) -> list[dict[str, Any]]:
        assert self.daemon.logins, "push before login"
        self.daemon.pushes.append(f"{repository}:{tag}")
        return [{"status": "Pushed"}, {"aux": {"Tag": tag, "Digest": "sha256:" + "cd" * 32}}]


class FakeDocker:
    def __init__(self) -> None:
        self.builds: list[dict[str, Any]] = []
        self.logins: list[dict[str, str]] = []
        self.pushes: list[str] = []
        self.store: dict[str, FakeImage] = {}
        self.images = FakeImages(self)

    def login(self, **kwargs: str) -> dict[str, str]:
        self.logins.append(kwargs)
        return {"Status": "Login Succeeded"}


@pytest.fixture
def docker(cli: Cli) -> FakeDocker:
    daemon = FakeDocker()
    cli.deps.docker_factory = lambda: daemon
    return daemon


def test_build_detects_the_project_dockerfile(tmp_path: Path, cli: Cli, docker: FakeDocker) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    (tmp_path / "trainctl.yaml").write_text(
        yaml.safe_dump({"name": "My Model", "script": "train.py", "pools": {"instance_types": ["m5.large"]}})
    )
    result = cli("build", "--project", str(tmp_path), "--spec", str(tmp_path / "trainctl.yaml"))
    assert result.exit_code == 0, result.stderr
    (build,) = docker.builds
    assert (build["path"], build["dockerfile"], build["tag"]) == (
        str(tmp_path.resolve()),
        "Dockerfile",
        "trainctl/my-model:my-model",
    )
    assert "Successfully built" in result.stdout


def test_build_falls_back_to_trainctls_own_dockerfile(tmp_path: Path, cli: Cli, docker: FakeDocker) -> None:
    result = cli("build", "--project", str(tmp_path), "--spec", str(tmp_path / "none.yaml"), "--json")
    assert result.exit_code == 0, result.stderr
    (build,) = docker.builds
    # training/Dockerfile copies from the repository root: that is its context.
    assert Path(build["path"]) == images.BUNDLED_CONTEXT
    assert build["dockerfile"] == "training/Dockerfile"
    assert result.json()["image"] == "trainctl/trainctl-train:latest"


def test_no_docker_daemon_is_a_clear_error(tmp_path: Path, cli: Cli) -> None:
    def no_daemon() -> Any:
        raise DockerException("Error while fetching server API version: Connection refused")

    cli.deps.docker_factory = no_daemon
    result = cli("build", "--project", str(tmp_path), "--spec", str(tmp_path / "none.yaml"))
    assert result.exit_code == 1
    assert "no Docker daemon reachable" in result.stderr and "start Docker" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_logs_in_with_the_ecr_token_and_pushes_to_the_stack_repo(
    stack: Stack, tmp_path: Path, cli: Cli, docker: FakeDocker
) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    spec = str(tmp_path / "none.yaml")
    not_built = cli("push", "--project", str(tmp_path), "--spec", spec, "--tag", "v1")
    assert not_built.exit_code == 1 and "trainctl build" in not_built.stderr

    result = cli("push", "--project", str(tmp_path), "--spec", spec, "--tag", "v1", "--build", "--json")
    assert result.exit_code == 0, result.stderr
    token = stack.ecr.get_authorization_token()["authorizationData"][0]
    username, _, password = base64.b64decode(token["authorizationToken"]).decode().partition(":")
    assert docker.logins == [{"username": username, "password": password, "registry": token["proxyEndpoint"]}]
    assert docker.pushes == [f"{stack.repository_uri}:v1"]
    assert result.json()["image"] == f"{stack.repository_uri}:v1"
    assert result.json()["digest"] == "sha256:" + "cd" * 32


# --- savings ----------------------------------------------------------------------------------

T = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T + timedelta(minutes=minutes)


def metric_line(name: str, value: float, job_id: str) -> str:
    return json.dumps({"trainctl_metric": name, "value": value, "unit": "Seconds", "job_id": job_id})


def hand_case_job(stack: Stack) -> jobs.Job:
    """tests/cli/test_costs.py's hand-computed case, on real (moto) instances, rows and logs."""
    m5, c5 = stack.pools("m5.large")[0], stack.pools("c5.xlarge", "c5.xlarge")[1]
    job = stack.new_job([m5, c5], now=T)
    job = stack.start_attempt(job, m5, at(0))
    old = job.instance_id
    assert old is not None
    job = stack.checkpoint(job, 500, at(50), final=False)
    job = stack.interrupt(job, at(60), notice=120)
    job = stack.checkpoint(job, 600, at(60) + timedelta(seconds=10), final=True)
    new = stack.launch(job.job_id, 1, c5)
    launched = stack.store.apply(
        jobs.mark_launching(
            job,
            instance_id=new,
            pool=c5.label,
            resume_point=jobs.ResumePoint(kind="final", step=600),
            now=at(60.5),
        )
    )
    running = stack.store.apply(jobs.mark_running(launched, instance_id=new, now=at(61)))
    done = stack.store.apply(jobs.mark_succeeded(running, instance_id=new, now=at(120.5)))
    # What the agents logged: the final checkpoint durable 40 s after the notice, training
    # running again on the replacement 90 s after it. (Logged now: CloudWatch refuses
    # events older than 14 days; the lines carry their own measure.)
    stack.put_logs(f"{job.job_id}/0/{old}", metric_line("TimeToCheckpoint", 40, job.job_id), at=time.time())
    stack.put_logs(f"{job.job_id}/1/{new}", metric_line("TimeToResume", 90, job.job_id), at=time.time())
    # The workflow retired the old instance at 11:00:43 (EC2's record says so).
    stack.retire(old, at(60) + timedelta(seconds=43))
    return done


def test_savings_report_from_ec2_price_history_matches_the_hand_case(
    stack: Stack, cli: Cli, tmp_path: Path
) -> None:
    zone_a, zone_b = (stack.zones[s] for s in stack.subnets)
    stack.spot_prices[("m5.large", zone_a)] = [
        ("2026-01-05T09:00:00Z", "0.030"),
        ("2026-01-05T10:30:00Z", "0.040"),
    ]
    stack.spot_prices[("c5.xlarge", zone_b)] = [("2026-01-05T10:00:00Z", "0.068")]
    stack.spot_prices[("c5.xlarge", zone_a)] = [("2026-01-05T10:00:00Z", "9.99")]  # other zone: ignored
    job = hand_case_job(stack)

    result = cli("savings", job.job_id, "--json", "--plot", str(tmp_path / "timeline.png"))
    assert result.exit_code == 0, result.stderr
    (report,) = result.json()["jobs"]
    assert [a["market"] for a in report["attempts"]] == ["spot", "spot"]
    assert [a["zone"] for a in report["attempts"]] == [zone_a, zone_b]
    first, second = report["attempts"]
    # The hand case of test_costs.py, except that EC2's own record ends attempt 0 at
    # 11:00:43 (three seconds after the agent's durable checkpoint): 3643 s, paid
    # 1800 s x 0.030/h + 1843 s x 0.040/h = 0.0354778; attempt 1 as there (0.068).
    assert (first["seconds"], first["ended_by"]) == (3643, "ec2")
    assert first["paid_usd"] == pytest.approx(1800 / 3600 * 0.030 + 1843 / 3600 * 0.040)
    assert report["paid_usd"] == pytest.approx(0.1034778, abs=1e-6)
    assert report["on_demand_same_seconds_usd"] == pytest.approx((3643 * 0.096 + 3600 * 0.17) / 3600)
    # Useful: 10:00-11:00 on m5.large, 11:01:30-12:00:30 on c5.xlarge (the agent's resume):
    # 3600 x 0.096/h + 3540 x 0.17/h = 0.096 + 0.1671667.
    assert (first["useful_seconds"], second["useful_seconds"]) == (3600, 3540)
    assert report["baseline_usd"] == pytest.approx(0.2631667, abs=1e-6)
    assert (report["lost_seconds"], report["recovery_seconds"], report["overlap_seconds"]) == (0, 30, 13)
    assert report["boot_seconds"] == 47  # retired 11:00:43 -> resumed 11:01:30
    assert report["net_saving_usd"] == pytest.approx(0.2631667 - 0.1034778, abs=1e-6)  # 0.1596889
    assert report["net_saving_pct"] == pytest.approx(60.68, abs=0.01)
    assert report["notes"] == []
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = cli("savings", job.job_id)
    assert "net saving         $0.1597 (60.7%)" in text.stdout
    assert "overlap 13s, boot 47s" in text.stdout
    everything = cli("savings", "--all", "--json").json()
    assert job.job_id in {r["job_id"] for r in everything["jobs"]}


def test_savings_falls_back_to_the_pool_for_instances_ec2_forgot(stack: Stack, cli: Cli) -> None:
    zone = stack.zones[stack.subnets[1]]
    stack.spot_prices[("m5.large", zone)] = [("2026-01-05T09:00:00Z", "0.048")]
    pool = stack.pools("m5.large", "m5.large")[1]
    job = stack.new_job([pool], now=T)
    # EC2 drops terminated instances from DescribeInstances after about an hour.
    gone = "i-0123456789abcdef0"
    job = stack.store.apply(
        jobs.mark_launching(
            job, instance_id=gone, pool=pool.label, resume_point=jobs.ResumePoint(kind="none"), now=at(0)
        )
    )
    job = stack.store.apply(jobs.mark_running(job, instance_id=gone, now=at(0)))
    stack.store.apply(jobs.mark_succeeded(job, instance_id=gone, now=at(30)))

    result = cli("savings", job.job_id, "--json")
    assert result.exit_code == 0, result.stderr
    (report,) = result.json()["jobs"]
    assert report["attempts"][0]["zone"] == zone
    assert report["paid_usd"] == pytest.approx(0.5 * 0.048)
    assert report["net_saving_usd"] == pytest.approx(0.5 * (0.096 - 0.048))
    assert any(gone in note and "assumed spot" in note for note in report["notes"])


def test_savings_unknown_type_and_bad_arguments(stack: Stack, cli: Cli) -> None:
    zone = stack.zones[stack.subnets[0]]
    stack.spot_prices[("g5.xlarge", zone)] = [("2026-01-05T09:00:00Z", "0.4")]
    job = stack.new_job(stack.pools("g5.xlarge"), now=T)
    job = stack.start_attempt(job, stack.pools("g5.xlarge")[0], at(0))
    assert job.instance_id is not None
    stack.store.apply(jobs.mark_succeeded(job, instance_id=job.instance_id, now=at(60)))
    saved = costs.ON_DEMAND_USD_PER_HOUR.pop("g5.xlarge")
    try:
        unknown = cli("savings", job.job_id)
        assert unknown.exit_code == 2
        assert "no on-demand price for instance type 'g5.xlarge'" in unknown.stderr
        overridden = cli("savings", job.job_id, "--on-demand-price", "g5.xlarge=1.0", "--json")
        assert overridden.exit_code == 0, overridden.stderr
        assert overridden.json()["jobs"][0]["net_saving_usd"] == pytest.approx(1.0 - 0.4)
    finally:
        costs.ON_DEMAND_USD_PER_HOUR["g5.xlarge"] = saved
    assert cli("savings").exit_code == 2
    assert "TYPE=USD_PER_HOUR" in cli("savings", job.job_id, "--on-demand-price", "g5.xlarge").stderr


# --- stack lookup, credentials, help ----------------------------------------------------------------


def test_output_names_match_the_stack_definition() -> None:
    from infra import stack as infra_stack
    from infra.config import TrainctlConfig

    for name in (
        "OUTPUT_JOBS_TABLE",
        "OUTPUT_CHECKPOINT_BUCKET",
        "OUTPUT_STATE_MACHINE",
        "OUTPUT_REPOSITORY_URI",
        "OUTPUT_CHECKPOINT_DOCUMENT",
        "OUTPUT_FIS_TEMPLATE",
        "OUTPUT_SUBNETS",
        "OUTPUT_INSTANCE_TYPES",
    ):
        assert getattr(stack_mod, name) == getattr(infra_stack, name), name
    assert TrainctlConfig.model_fields["stack_name"].default == stack_mod.DEFAULT_STACK_NAME


def test_missing_credentials_and_profile_are_clear_errors(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = cli("list")
    assert result.exit_code == 1
    assert "no usable AWS credentials" in result.stderr and "Traceback" not in result.stderr
    profile = cli("list", "--profile", "nope")
    assert profile.exit_code == 2 and "AWS profile 'nope' not found" in profile.stderr


def render_help(cli: Cli) -> str:
    commands = [
        "submit",
        "status",
        "list",
        "cancel",
        "logs",
        "interrupt",
        "build",
        "push",
        "savings",
        "rehearse",
    ]
    parts = [cli("--help").stdout] + [cli(c, "--help").stdout for c in commands]
    # Trailing padding is the terminal's, not the text's.
    return "\n".join(line.rstrip() for line in "\n".join(parts).splitlines()) + "\n"


def test_help_snapshot(cli: Cli) -> None:
    """`--help` is part of the interface: changes to it are reviewed as a text diff.

    Refresh after an intended change: TRAINCTL_UPDATE_HELP=1 pytest tests/cli -k help_snapshot
    """
    text = render_help(cli)
    if os.environ.get("TRAINCTL_UPDATE_HELP") == "1":
        HELP_SNAPSHOT.write_text(text)
    assert HELP_SNAPSHOT.exists(), "no snapshot yet: run with TRAINCTL_UPDATE_HELP=1"
    assert text == HELP_SNAPSHOT.read_text(), "help changed: review, then refresh (see docstring)"
    # Readable: fits 120 columns, every command explains itself.
    assert max(len(line) for line in text.splitlines()) <= 120
    for command in ("submit", "savings", "cancel", "interrupt", "rehearse"):
        assert command in text
