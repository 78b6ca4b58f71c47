"""What gets installed where: pyproject's dependencies, the Lambda layer, the image, the
instance bootstrap, and the Docker build context.

Read from the files themselves (imports by AST, install lines, .dockerignore), so a new
import or a changed install line cannot drift from what is declared without a failure
here. No network, no Docker daemon: distributions are resolved from the installed
metadata (`importlib.metadata`), the user data runs with the instance's commands stubbed.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
TRAINCTL = ROOT / "training" / "trainctl"
CORE = ROOT / "layers" / "core" / "python" / "trainctl_core"
EXAMPLES = ROOT / "training" / "examples"
DOCKERFILE = ROOT / "training" / "Dockerfile"
USER_DATA = ROOT / "training" / "bootstrap" / "user-data.sh"
FIRST_PARTY = {"trainctl", "trainctl_core", "functions", "infra"}

# What runs on an instance or a laptop from a plain `pip install trainctl`: the library,
# the agent, the CLI. Not `integrations` (optional, imported by the user's script where
# the framework is installed) nor `rehearse` (the `rehearse` extra).
RUNTIME_MODULES = sorted(
    [
        *(TRAINCTL / name for name in ("__init__.py", "checkpoint.py", "snapshot.py", "cli.py")),
        *(TRAINCTL / name for name in ("runtime_env.py", "spec.py")),
        *(TRAINCTL / "agent").glob("*.py"),
        *(TRAINCTL / "commands").glob("*.py"),
        *CORE.glob("*.py"),
    ]
)
# Lazy imports of an optional dependency, each inside a function and provided by an extra.
OPTIONAL = {
    # Only for a state holding torch tensors, i.e. in a process that imported torch.
    ("training/trainctl/snapshot.py", "torch"): "train",
    # `trainctl savings --plot`; a missing matplotlib is a CliError naming the extra.
    ("training/trainctl/commands/plot.py", "matplotlib"): "train",
}
# What a Lambda function has without pip: the Python runtime's boto3 (with botocore,
# s3transfer, jmespath, dateutil, urllib3) and the AWS-managed Powertools layer (with
# pydantic and the X-Ray SDK). The core layer itself is source only (layers/core).
LAMBDA_PROVIDED = {
    "boto3",
    "botocore",
    "s3transfer",
    "jmespath",
    "dateutil",
    "urllib3",
    "aws_lambda_powertools",
    "pydantic",
    "pydantic_core",
    "typing_extensions",
    "aws_xray_sdk",
}


@dataclass(frozen=True)
class Import:
    file: str  # repo-relative
    module: str  # dotted, as written
    lineno: int
    module_level: bool
    names: tuple[str, ...] = ()  # `from module import names`

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def imports_of(path: Path) -> list[Import]:
    """Absolute imports of a file, except those only for type checkers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []
    relative = str(path.relative_to(ROOT))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for branch in child.orelse:  # the `else:` of `if TYPE_CHECKING` runs
                    visit(branch, in_function)
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(relative, a.name, child.lineno, not in_function) for a in child.names)
            elif (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and child.module not in (None, "__future__")
            ):
                names = tuple(a.name for a in child.names)
                found.append(Import(relative, str(child.module), child.lineno, not in_function, names))
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, nested)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def third_party(found: Iterable[Import]) -> Iterator[Import]:
    for imp in found:
        if imp.top not in sys.stdlib_module_names and imp.top not in FIRST_PARTY:
            yield imp


@cache
def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def declared(extra: str | None = None) -> set[str]:
    """Distributions pip installs for `trainctl` (or one extra of it): the declared
    requirements and, from the installed metadata, everything they require in turn."""
    project = _project()
    top = project["optional-dependencies"][extra] if extra else project["dependencies"]  # type: ignore[index]
    return _closure([Requirement(r) for r in top])


def _closure(requirements: Iterable[Requirement]) -> set[str]:
    seen: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or name == "trainctl":
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # declared but not installed here: the import check below fails then
        for line in requires:
            nested = Requirement(line)
            environments = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
            if nested.marker is None or any(nested.marker.evaluate(env) for env in environments):
                pending.append(nested)
    return seen


@cache
def _packages() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def distributions_of(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _packages().get(module, [])}


# --- pyproject: every runtime import is a declared dependency -------------------------------------


def test_every_third_party_import_of_the_runtime_is_a_declared_dependency() -> None:
    core = declared()
    problems = []
    for imp in third_party(i for path in RUNTIME_MODULES for i in imports_of(path)):
        dists = distributions_of(imp.top)
        if dists & core:
            continue
        extra = OPTIONAL.get((imp.file, imp.top))
        if extra is not None and not imp.module_level and dists & declared(extra):
            continue
        where = "not installed at all" if not dists else f"distribution {sorted(dists)}"
        problems.append(
            f"{imp.file}:{imp.lineno} imports {imp.module} ({where}): not in [project].dependencies"
        )
    assert not problems, "\n".join(problems)


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = {"trainctl": TRAINCTL, "trainctl_core": CORE}.get(parts[0])
    if base is None:
        return None
    for candidate in (base.joinpath(*parts[1:]).with_suffix(".py"), base.joinpath(*parts[1:], "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def load_time_imports(*entry_points: str) -> list[Import]:
    """The module-level imports of `entry_points` and of every first-party module they
    import at module level, transitively (packages' __init__ included): what `import`
    of an entry point executes."""
    pending, seen, result = list(entry_points), set(), []
    while pending:
        name = pending.pop()
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen]
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for imp in imports_of(path):
            if not imp.module_level:
                continue
            result.append(imp)
            if imp.top in FIRST_PARTY:
                pending.append(imp.module)
                pending += [f"{imp.module}.{n}" for n in imp.names if _module_file(f"{imp.module}.{n}")]
    return result


def test_what_the_cli_and_the_checkpoint_library_import_at_load_time_is_declared() -> None:
    # `trainctl agent` (the image's entrypoint, the unit's ExecStart) loads trainctl.cli
    # and everything it registers; a training script loads trainctl.checkpoint.
    found = load_time_imports("trainctl.cli", "trainctl.checkpoint")
    assert any(i.file.endswith("trainctl/snapshot.py") for i in found)  # the walk follows imports
    missing = sorted(
        {
            f"{i.file}:{i.lineno} {i.module}"
            for i in third_party(found)
            if not distributions_of(i.top) & declared()
        }
    )
    assert missing == []


def test_the_checkpoint_library_imports_with_only_the_core_dependencies() -> None:
    # The failure this guards against: numpy only in an extra, so `import trainctl.checkpoint`
    # failed in the image and on an instance.
    for module in ("numpy", "xxhash"):
        assert distributions_of(module) & declared(), f"{module} must be a core dependency"
    for imp in third_party(imports_of(TRAINCTL / "snapshot.py")):
        if imp.module_level:
            assert distributions_of(imp.top) & declared(), imp


# --- the Lambda layer: only what Lambda provides ----------------------------------------------------


def _lambda_imports() -> list[Import]:
    """Imports of every handler and of the trainctl_core modules they reach, transitively."""
    files = sorted((ROOT / "functions").rglob("*.py"))
    seen: set[Path] = set()
    result: list[Import] = []
    while files:
        path = files.pop()
        if path in seen:
            continue
        seen.add(path)
        for imp in imports_of(path):
            result.append(imp)
            parts = imp.module.split(".")
            if parts[0] != "trainctl_core":
                continue
            candidates = [CORE / "__init__.py", CORE.joinpath(*parts[1:]).with_suffix(".py")]
            if len(parts) == 1:  # `from trainctl_core import clients` names modules
                candidates += [CORE / f"{name}.py" for name in imp.names]
            files += [c for c in candidates if c.is_file()]
    return result


def test_the_lambda_functions_reach_only_what_the_runtime_and_powertools_layer_provide() -> None:
    reached = _lambda_imports()
    assert any(i.top == "trainctl_core" for i in reached)  # the walk does follow the layer
    extra = sorted({i.top for i in third_party(reached)} - LAMBDA_PROVIDED)
    assert extra == [], f"a Lambda would fail to import {extra}: the core layer ships no dependencies"


def test_the_core_layer_never_imports_numpy() -> None:
    users = [i for path in CORE.rglob("*.py") for i in imports_of(path) if i.top == "numpy"]
    assert users == []


# --- the image: what examples/train.py (and the other examples) need ---------------------------------


def _pip_installs(commands: Iterable[str]) -> list[list[str]]:
    """The requirement arguments of each `pip install` in `commands` (options dropped)."""
    installs = []
    for command in commands:
        words = shlex.split(command)
        for i, word in enumerate(words):
            if word.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
                args, skip = [], False
                for arg in words[i + 2 :]:
                    if arg in ("&&", ";", "|"):
                        break
                    if skip:
                        skip = False
                    elif arg in ("--index-url", "-i", "--extra-index-url"):
                        skip = True
                    elif not arg.startswith("-"):
                        args.append(arg)
                installs.append(args)
    return installs


def _dockerfile_runs() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("RUN ")]


def _train_extra_pin(name: str) -> str:
    (pin,) = [r for r in _project()["optional-dependencies"]["train"] if Requirement(r).name == name]  # type: ignore[index]
    return str(pin)


def _covers_the_examples(installed: list[str]) -> list[str]:
    """The examples' third-party imports not provided by `installed` (`.`: the project)."""
    requirements = [Requirement(r) for r in installed if r not in (".",) and not r.startswith("/")]
    provided = _closure(requirements)
    if any(r == "." or r.startswith("/") for r in installed):
        provided |= declared()
    missing = []
    for path in sorted(EXAMPLES.glob("*.py")):
        for imp in third_party(imports_of(path)):
            if not distributions_of(imp.top) & provided:
                missing.append(f"{imp.file}:{imp.lineno} {imp.module}")
    return missing


def test_the_image_installs_the_project_and_the_pinned_cpu_torch() -> None:
    runs = _dockerfile_runs()
    installs = _pip_installs(runs)
    assert [_train_extra_pin("torch")] in installs  # the pin of pyproject's train extra
    assert any(
        "https://download.pytorch.org/whl/cpu" in run and _train_extra_pin("torch") in run for run in runs
    )
    assert ["."] in installs
    assert "COPY training/examples" in DOCKERFILE.read_text()


def test_the_image_provides_every_import_of_the_examples() -> None:
    installed = [arg for args in _pip_installs(_dockerfile_runs()) for arg in args]
    assert _covers_the_examples(installed) == []


# --- the instance bootstrap: run it with the instance's commands stubbed ------------------------------

_PLACEHOLDERS = {
    "JobsTableName": "trainctl-jobs",
    "CheckpointBucketName": "trainctl-ckpt",
    "AgentLogGroupName": "/trainctl/agent",
    "AWS::Region": "eu-west-1",
    "JobsPartitionKey": "pk",
    "JobKeyPrefix": "JOB#",
}
_ABSOLUTE = re.compile(
    r"(?<![\w/])(/run/trainctl|/var/lib/trainctl|/etc/trainctl|/etc/systemd/system|/usr/local/bin/)"
)
_STUBS = {
    "dnf": 'echo "dnf $*" >> "$LOG"',
    "systemctl": 'echo "systemctl $*" >> "$LOG"',
    "docker": 'echo "docker $*" >> "$LOG"',
    "curl": """case "$*" in
  *"-X PUT"*) echo token ;;
  *trainctl:job-id) echo job-1 ;;
  *) exit 22 ;;
esac""",
    "aws": 'echo "aws $*" >> "$LOG"; [ "$1 $2" = "dynamodb get-item" ] && echo "$JOB_IMAGE"; exit 0',
    "shutdown": 'echo "shutdown $*" >> "$LOG"',
    # `-m venv DIR` makes a venv of logging stubs; `-m zipfile` (the unpacking) is real
    "python3.11": """echo "python3.11 $*" >> "$LOG"
if [ "$1 $2" = "-m venv" ]; then
  venv="${@: -1}"
  mkdir -p "$venv/bin"
  for tool in pip python trainctl; do
    printf '#!/bin/bash\\necho "%s $*" >> "$LOG"\\n' "$tool" > "$venv/bin/$tool"
    chmod +x "$venv/bin/$tool"
  done
  # pip fails on an install that names $PIP_FAILS_ON (an index down mid-download)
  echo 'case "$*" in *"$PIP_FAILS_ON"*) [ -z "$PIP_FAILS_ON" ] || exit 1 ;; esac' >> "$venv/bin/pip"
  # The venv's python imports torch only where the AMI ships it (AMI_TORCH=1)
  printf '#!/bin/bash\\necho "python $*" >> "$LOG"\\n' > "$venv/bin/python"
  echo '[ "$*" != "-c import torch" ] || [ "$AMI_TORCH" = 1 ]' >> "$venv/bin/python"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
""",
}
_TOOLS = ("cat", "chmod", "cp", "cut", "dirname", "install", "ln", "mkdir", "rm")


@dataclass
class Boot:
    home: Path
    log: list[str]
    unit: dict[str, list[str]]


def boot(
    tmp_path: Path,
    *,
    image: str = "None",
    gpu: bool = False,
    ami_torch: bool = False,
    pip_fails_on: str = "",
) -> Boot:
    """Run user-data.sh as an instance would, under `tmp_path`, with stubbed commands.
    With `pip_fails_on`, the bootstrap must fail: `Boot.unit` is then empty."""
    root, stubs, tools = tmp_path / "root", tmp_path / "stubs", tmp_path / "tools"
    for folder in ("usr/local/bin", "etc/systemd/system", "opt", "run", "var/lib"):
        (root / folder).mkdir(parents=True)
    stubs.mkdir()
    tools.mkdir()
    scripts = dict(_STUBS)
    if gpu:
        scripts["nvidia-smi"] = 'echo "GPU 0: NVIDIA A10G"'
    for name, body in scripts.items():
        (stubs / name).write_text("#!/bin/bash\n" + body + "\n")
        (stubs / name).chmod(0o755)
    for tool in _TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    archive = tmp_path / "agent.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("pyproject.toml", "[project]\nname = 'trainctl'\n")
    home = root / "opt" / "trainctl"
    values = _PLACEHOLDERS | {
        "AgentArchive": str(archive),
        "AgentHome": str(home),
        "AgentBin": f"{root}/usr/local/bin/trainctl",
    }
    script = re.sub(r"\$\{([A-Za-z:]+)\}", lambda m: values[m.group(1)], USER_DATA.read_text())
    assert "${" not in script
    script = _ABSOLUTE.sub(lambda m: f"{root}{m.group(1)}", script)
    (tmp_path / "user-data").write_text(script)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{stubs}:{tools}",
        "LOG": str(log),
        "REAL_PYTHON": sys.executable,
        "JOB_IMAGE": image,
        "AMI_TORCH": "1" if ami_torch else "0",
        "PIP_FAILS_ON": pip_fails_on,
    }
    ran = subprocess.run(
        ["/bin/bash", str(tmp_path / "user-data")], env=env, capture_output=True, text=True, timeout=60
    )
    if pip_fails_on:
        assert ran.returncode != 0 and "trainctl bootstrap failed at line" in ran.stderr, ran.stderr
        return Boot(home, log.read_text().splitlines(), {})
    assert ran.returncode == 0, ran.stderr
    unit: dict[str, list[str]] = {}
    for line in (root / "etc/systemd/system/trainctl-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit.setdefault(key, []).append(value)
    return Boot(home, log.read_text().splitlines(), unit)


def _unit_path(unit: dict[str, list[str]]) -> str | None:
    paths = [v.removeprefix("PATH=") for v in unit.get("Environment", []) if v.startswith("PATH=")]
    assert len(paths) <= 1
    return paths[0] if paths else None


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_on_the_host_the_jobs_python_is_the_venvs_with_trainctl_and_torch(tmp_path: Path, gpu: bool) -> None:
    # When an instance boots a job without an image
    result = boot(tmp_path, gpu=gpu)
    # Then the agent, and so the job it starts, runs with the venv first on PATH: the
    # job's `python train.py` is the Python trainctl was installed into
    path = _unit_path(result.unit)
    assert path is not None
    assert shutil.which("python", path=path) == str(result.home / "venv" / "bin" / "python")
    assert {"/usr/bin", "/usr/local/bin"} <= set(path.split(":"))  # the system tools too
    # And that venv got the project and the pinned PyTorch (CPU build without a GPU)
    pins = [line.split()[2:] for line in result.log if line.startswith("pip install")]
    torch = _train_extra_pin("torch")
    assert ["--quiet", str(result.home / "src")] in pins
    retried = ["--quiet", "--retries", "10", "--timeout", "60"]  # a multi-GB download
    cpu = [*retried, "--index-url", "https://download.pytorch.org/whl/cpu", torch]
    assert ([*retried, torch] if gpu else cpu) in pins
    # Which is everything the examples import
    installed = [arg for args in _pip_installs(result.log) for arg in args]
    assert _covers_the_examples(installed) == []


def test_a_bootstrap_that_fails_powers_the_instance_off_instead_of_billing_without_an_agent(
    tmp_path: Path,
) -> None:
    # When PyTorch's download fails for good on a replacement
    result = boot(tmp_path, pip_fails_on="torch==")
    # Then no agent unit was written, and the instance powers off (the launch template
    # terminates on shutdown: the instance-state rule recovers the job elsewhere)
    assert not (result.home.parent.parent / "etc/systemd/system/trainctl-agent.service").exists()
    assert not any(line.startswith("systemctl") and "start" in line for line in result.log)
    assert result.log[-1] == "shutdown -h now"


def test_on_an_ami_that_ships_torch_the_host_venv_uses_it_instead_of_downloading(tmp_path: Path) -> None:
    # Given an AMI whose Python 3.11 already has PyTorch (e.g. a Deep Learning AMI)
    result = boot(tmp_path, gpu=True, ami_torch=True)

    # Then the venv sees the system's packages and no replacement downloads torch again
    assert f"python3.11 -m venv --system-site-packages {result.home / 'venv'}" in result.log
    pins = [line.split()[2:] for line in result.log if line.startswith("pip install")]
    assert not any(arg.startswith("torch") for args in pins for arg in args)
    assert ["--quiet", str(result.home / "src")] in pins


def test_in_container_mode_the_host_venv_gets_neither_torch_nor_a_path(tmp_path: Path) -> None:
    # The image has its own Python and torch; the host's venv only runs checkpoint-now
    result = boot(tmp_path, image="123456789012.dkr.ecr.eu-west-1.amazonaws.com/trainctl:abc")
    assert _unit_path(result.unit) is None
    assert not any("torch" in line for line in result.log if line.startswith("pip"))
    assert [line for line in result.log if line.startswith("pip install")] == [
        "pip install --quiet --upgrade pip",
        f"pip install --quiet {result.home / 'src'}",
    ]


# --- the Docker build context ------------------------------------------------------------------------


def _dockerignore() -> list[str]:
    # Parsed as the Docker SDK does for `images.build(path=...)` (trainctl build).
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_build_context_sends_what_the_dockerfile_copies_and_nothing_bulky() -> None:
    from docker.utils.build import exclude_paths

    from trainctl.commands.images import BUNDLED_CONTEXT, BUNDLED_DOCKERFILE

    assert BUNDLED_CONTEXT == ROOT  # the bundled Dockerfile builds from the repository root
    context = set(exclude_paths(str(ROOT), _dockerignore(), dockerfile="training/Dockerfile"))
    # Every COPY source is in the context, whole
    copies = [
        line.split()[1:-1] for line in BUNDLED_DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
    ]
    sources = [source for sources in copies for source in sources]
    assert "pyproject.toml" in sources and "training/examples" in sources
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        wanted = {str(f.relative_to(ROOT)) for f in files if "__pycache__" not in f.parts}
        assert wanted and wanted <= context, f"{source}: {sorted(wanted - context)[:5]} excluded"
    # And none of the large or local folders is sent to the daemon
    for bulky in (".venv", "node_modules", ".git", "cdk.out"):
        assert not any(p == bulky or p.startswith(bulky + "/") for p in context), bulky
    assert not any(p.endswith(".pyc") or "__pycache__" in p.split("/") for p in context)
