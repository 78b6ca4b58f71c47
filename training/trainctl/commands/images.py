"""`trainctl build` / `trainctl push`: the training image, built with the Docker SDK, in ECR.

The Dockerfile is the project's (`--dockerfile`, the spec's `dockerfile:`, or
`./Dockerfile`), else trainctl's own `training/Dockerfile` built from the repository root.
The Docker client comes from `Deps.docker_factory` (tests inject a fake daemon); no
daemon is a clear error, not a traceback.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from trainctl.commands.output import (
    JsonOpt,
    ProfileOpt,
    RegionOpt,
    StackOpt,
    cloud_of,
    console,
    deps,
    emit_json,
    reporting,
)
from trainctl.commands.stack import EXIT_USAGE, CliError, Cloud
from trainctl.spec import DEFAULT_SPEC_FILE, SpecFile, job_id_stem, load_spec

# training/Dockerfile of this checkout (editable install / source tree); its COPY lines
# are relative to the repository root, which is therefore its build context.
BUNDLED_DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"
BUNDLED_CONTEXT = BUNDLED_DOCKERFILE.parents[1]
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class BuildPlan:
    dockerfile: Path
    context: Path
    local_name: str
    tag: str

    @property
    def local_ref(self) -> str:
        return f"{self.local_name}:{self.tag}"


def image_tag(spec: SpecFile | None) -> str:
    """The tag trainctl pushes a spec's image under (and `submit` looks for)."""
    return job_id_stem(spec.name) if spec is not None else DEFAULT_TAG


def plan_build(project: Path, dockerfile: Path | None, spec_path: Path, tag: str | None) -> BuildPlan:
    spec = load_spec(spec_path) if spec_path.exists() else None
    if dockerfile is None and spec is not None and spec.dockerfile:
        dockerfile = spec_path.parent / spec.dockerfile
    if dockerfile is not None:
        if not dockerfile.is_file():
            raise CliError(f"Dockerfile {dockerfile} does not exist", exit_code=EXIT_USAGE)
        context = project
    elif (project / "Dockerfile").is_file():
        dockerfile, context = project / "Dockerfile", project
    elif BUNDLED_DOCKERFILE.is_file():
        dockerfile, context = BUNDLED_DOCKERFILE, BUNDLED_CONTEXT
    else:
        raise CliError(
            f"no Dockerfile in {project} and trainctl's training/Dockerfile is not installed",
            exit_code=EXIT_USAGE,
            hint="pass --dockerfile PATH",
        )
    try:
        relative = dockerfile.resolve().relative_to(context.resolve())
    except ValueError:
        raise CliError(
            f"Dockerfile {dockerfile} is outside the build context {context}", exit_code=EXIT_USAGE
        ) from None
    stem = job_id_stem(spec.name) if spec is not None else "trainctl-train"
    return BuildPlan(
        dockerfile=relative,
        context=context.resolve(),
        local_name=f"trainctl/{stem}",
        tag=tag or image_tag(spec),
    )


def docker_client(factory: Any) -> Any:
    try:
        from docker.errors import DockerException
    except ImportError:  # pragma: no cover - docker is a dependency of the CLI
        raise CliError("the Docker SDK is not installed: pip install docker") from None
    try:
        return factory()
    except DockerException as exc:
        raise CliError(
            f"no Docker daemon reachable ({exc})",
            hint="start Docker (or set DOCKER_HOST), then run the command again",
        ) from None


def build_image(client: Any, plan: BuildPlan, *, echo: bool) -> str:
    from docker.errors import APIError, BuildError

    try:
        image, log = client.images.build(
            path=str(plan.context), dockerfile=str(plan.dockerfile), tag=plan.local_ref, rm=True
        )
    except BuildError as exc:
        tail = [str(c.get("stream", c.get("error", ""))).rstrip() for c in exc.build_log][-5:]
        raise CliError(
            f"docker build failed: {exc.msg}", hint=" | ".join(t for t in tail if t) or None
        ) from None
    except APIError as exc:
        raise CliError(f"docker build failed: {exc.explanation or exc}") from None
    if echo:
        for chunk in log:
            text = str(chunk.get("stream", "")).rstrip()
            if text:
                typer.echo(text)
    return str(image.id)


def ecr_login(cloud: Cloud, client: Any) -> str:
    """Log the Docker client in to the stack's registry; returns the registry endpoint."""
    data = cloud.client("ecr").get_authorization_token()["authorizationData"][0]
    username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    registry = str(data["proxyEndpoint"])
    from docker.errors import APIError

    try:
        client.login(username=username, password=password, registry=registry)
    except APIError as exc:
        raise CliError(f"docker login to {registry} failed: {exc.explanation or exc}") from None
    return registry


def push_image(cloud: Cloud, client: Any, plan: BuildPlan) -> dict[str, Any]:
    from docker.errors import APIError, ImageNotFound

    repository = cloud.repository_uri
    try:
        image = client.images.get(plan.local_ref)
    except ImageNotFound:
        raise CliError(
            f"no local image {plan.local_ref}", hint="run `trainctl build` first, or push --build"
        ) from None
    registry = ecr_login(cloud, client)
    image.tag(repository, tag=plan.tag)
    digest = None
    try:
        for line in client.images.push(repository, tag=plan.tag, stream=True, decode=True):
            if line.get("error"):
                raise CliError(f"docker push failed: {line['error']}")
            digest = (line.get("aux") or {}).get("Digest", digest)
    except APIError as exc:
        raise CliError(f"docker push failed: {exc.explanation or exc}") from None
    return {"image": f"{repository}:{plan.tag}", "registry": registry, "digest": digest}


def pushed_image(cloud: Cloud, spec: SpecFile) -> str:
    """`<repo>:<tag>` of the spec's image, which must have been pushed already (submit)."""
    repository = cloud.repository_uri
    tag = image_tag(spec)
    ecr = cloud.client("ecr")
    name = repository.split("/", 1)[1] if "/" in repository else repository
    try:
        ecr.describe_images(repositoryName=name, imageIds=[{"imageTag": tag}])
    except ecr.exceptions.ImageNotFoundException:
        raise CliError(
            f"image {repository}:{tag} is not in ECR (the spec names a Dockerfile)",
            exit_code=EXIT_USAGE,
            hint="run `trainctl push --build` first",
        ) from None
    return f"{repository}:{tag}"


ProjectOpt = Annotated[Path, typer.Option("--project", help="The project directory.")]
DockerfileOpt = Annotated[Path | None, typer.Option("--dockerfile", help="Dockerfile (default: detected).")]
SpecOpt = Annotated[Path, typer.Option("--spec", "-f", help="The job spec (for its name/dockerfile).")]
TagOpt = Annotated[
    str | None, typer.Option("--tag", help="Image tag (default: the spec's name, else latest).")
]


def build(
    ctx: typer.Context,
    project: ProjectOpt = Path("."),
    dockerfile: DockerfileOpt = None,
    spec: SpecOpt = Path(DEFAULT_SPEC_FILE),
    tag: TagOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Build the training image (project Dockerfile, else trainctl's training/Dockerfile)."""
    with reporting(json_output):
        plan = plan_build(project, dockerfile, spec, tag)
        client = docker_client(deps(ctx).docker_factory)
        image_id = build_image(client, plan, echo=not json_output)
        if json_output:
            emit_json(
                {"image": plan.local_ref, "id": image_id, "dockerfile": str(plan.context / plan.dockerfile)}
            )
        else:
            console().print(f"built {plan.local_ref} ({image_id[:19]}) from {plan.context / plan.dockerfile}")


def push(
    ctx: typer.Context,
    project: ProjectOpt = Path("."),
    dockerfile: DockerfileOpt = None,
    spec: SpecOpt = Path(DEFAULT_SPEC_FILE),
    tag: TagOpt = None,
    and_build: Annotated[bool, typer.Option("--build", help="Build first.")] = False,
    stack: StackOpt = None,
    region: RegionOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Push the training image to the stack's ECR repository."""
    with reporting(json_output):
        plan = plan_build(project, dockerfile, spec, tag)
        cloud = cloud_of(ctx, stack, region, profile)
        repository = cloud.repository_uri  # fail on a missing stack before touching Docker
        client = docker_client(deps(ctx).docker_factory)
        if and_build:
            build_image(client, plan, echo=not json_output)
        result = push_image(cloud, client, plan)
        if json_output:
            emit_json({"local": plan.local_ref, "repository": repository, **result})
        else:
            console().print(f"pushed {plan.local_ref} -> {result['image']}")
