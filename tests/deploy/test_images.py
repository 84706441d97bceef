"""The service images (Dockerfile, .dockerignore) and the health check they ship.

No Docker engine here. The Dockerfile at the repository root is one recipe for all four services
(`--build-arg SERVICE=<name>`). It is checked as text (multi-stage, non-root, nothing the build
needs hidden by .dockerignore, nothing secret sent in the build context), and its build stage is
replayed for each service: exactly the files its COPY instructions take from the build context
(after .dockerignore) are laid out in a temporary directory, its RUN instructions (the same
`uv sync` commands) run there, and the service is imported from the virtualenv they make, with the
source tree gone as it is in the runtime image. The health check script runs for real against a
gRPC server with mutual TLS."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.deploy.conftest import ROOT, SERVICES

DOCKERFILE = ROOT / "Dockerfile"
HEALTH_CHECK = ROOT / "deploy" / "docker" / "grpc_health_check.py"
# What tools/gen_protos.py (`make gen`) writes, and so what the contracts stage makes.
GENERATED = ROOT / "libs" / "contracts" / "src"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions after its FROM, by stage name (or index when unnamed)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(out))
            current = out[name] = []
        elif current is not None:
            current.append((keyword, args))
    return out


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def substitute(text: str, variables: Mapping[str, str], *, unknown: str | None = None) -> str:
    """Docker's ${NAME} / $NAME substitution; unknown names become `unknown` (None: left as written)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in variables:
            return variables[name]
        return match.group(0) if unknown is None else unknown

    return _VARIABLE.sub(value, text)


def service_steps(svc: str) -> dict[str, list[tuple[str, str]]]:
    """The stages as built with --build-arg SERVICE=<svc> (for the checks that read them as text)."""
    return {
        name: [(keyword, substitute(args, {"SERVICE": svc})) for keyword, args in steps]
        for name, steps in stages(DOCKERFILE.read_text()).items()
    }


def copy_operands(args: str) -> tuple[dict[str, str], list[str], str]:
    """COPY's flags (--from=..., --chown=...), sources and destination."""
    words = json.loads(args) if args.startswith("[") else args.split()
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def env_pairs(args: str) -> dict[str, str]:
    """ENV's NAME=value pairs (or its older `ENV NAME value` form), values as written."""
    if "=" not in args.split(None, 1)[0]:
        name, value = args.split(None, 1)
        return {name: value}
    return dict(pair.partition("=")[::2] for pair in shlex.split(args))


def workspace_members() -> list[str]:
    """The root pyproject's workspace members (globs expanded), as uv finds them."""
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]
    members = {p.parent for g in workspace["members"] for p in ROOT.glob(f"{g}/pyproject.toml")}
    excluded = {p for g in workspace.get("exclude", []) for p in ROOT.glob(g)}
    return sorted(m.relative_to(ROOT).as_posix() for m in members - excluded)


def test_one_recipe_for_every_service() -> None:
    assert DOCKERFILE.is_file()
    for svc in SERVICES:
        assert not (ROOT / "services" / svc / "Dockerfile").exists(), "one Dockerfile, chosen by ARG SERVICE"
    all_stages = stages(DOCKERFILE.read_text())
    # SERVICE has no default: a build without it stops at once rather than building some service.
    for name in ("build", "runtime"):
        assert ("ARG", "SERVICE") in all_stages[name], name
    for name, steps in all_stages.items():
        assert not any(keyword == "ARG" and args.startswith("SERVICE=") for keyword, args in steps), name


def test_every_stage_that_runs_uv_has_every_workspace_member() -> None:
    """uv reads the whole workspace: a member's pyproject.toml left out of the context (as
    libs/client's once was) makes `uv sync --frozen` fail inside the build."""
    members = workspace_members()
    assert {"libs/client", "libs/common", "libs/contracts", *(f"services/{s}" for s in SERVICES)} <= set(members)
    for name, steps in stages(DOCKERFILE.read_text()).items():
        if not any(keyword == "RUN" and re.search(r"\buv (sync|export)\b", args) for keyword, args in steps):
            continue
        copied = {
            source
            for keyword, args in steps
            if keyword == "COPY" and "from" not in copy_operands(args)[0]
            for source in copy_operands(args)[1]
        }
        assert {"pyproject.toml", "uv.lock"} <= copied, name
        for member in members:
            assert f"{member}/pyproject.toml" in copied, f"stage {name} does not copy {member}/pyproject.toml"


@pytest.mark.parametrize("svc", SERVICES)
def test_dockerfile_builds_only_this_service_and_runs_as_non_root(svc: str) -> None:
    by_stage = service_steps(svc)
    assert list(by_stage)[-3:] == ["contracts", "build", "runtime"]
    steps = [step for stage_steps in by_stage.values() for step in stage_steps]
    runtime = by_stage["runtime"]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users == ["10001:10001"]
    assert ("CMD", '["csx-service"]') in runtime
    labels = " ".join(args for keyword, args in runtime if keyword == "LABEL")
    assert f'org.opencontainers.image.title="csx-{svc}"' in labels
    runtime_copies = [args for keyword, args in runtime if keyword == "COPY"]
    # The runtime stage takes only the built virtualenv and the health check.
    assert runtime_copies == [
        "--from=build /opt/csx/venv /opt/csx/venv",
        "deploy/docker/grpc_health_check.py /opt/csx/grpc_health_check.py",
    ]
    syncs = [args for keyword, args in steps if keyword == "RUN" and "uv sync" in args]
    assert syncs and all(f"--package csx-{svc}" in s and "--frozen" in s and "--no-dev" in s for s in syncs)
    assert any("--no-editable" in s for s in syncs)
    sources = [s for keyword, args in steps if keyword == "COPY" for s in copy_operands(args)[1]]
    assert f"services/{svc}/src" in sources
    for lib in ("libs/common/src", "libs/client/src"):
        assert lib in sources
    for other in SERVICES:
        if other != svc:
            assert f"services/{other}/src" not in " ".join(sources)
    assert "libs/cli/src" not in " ".join(sources)
    # The migration entry point the compose step and the Helm Job run exists.
    assert (ROOT / "services" / svc / "src" / f"csx_{svc}" / "migrate.py").is_file()


# --- the build stage, replayed without Docker ----------------------------------------------------------


def find_uv() -> str:
    """As the Makefile does: $UV, else uv on PATH, else the one `make bootstrap` puts in .tools."""
    for candidate in (os.environ.get("UV"), shutil.which("uv"), ".tools/bin/uv"):
        if candidate:
            path = Path(candidate) if Path(candidate).is_absolute() else ROOT / candidate
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    pytest.fail("no uv: set UV, put uv on PATH or run `make bootstrap` (it installs .tools/bin/uv)")


class BuildFailed(AssertionError):
    pass


@dataclass
class Replay:
    """A stage replayed into `fs`, which stands for the container's root directory."""

    fs: Path
    env: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    workdir: PurePosixPath = PurePosixPath("/")
    log: list[str] = field(default_factory=list)
    imported: subprocess.CompletedProcess[str] | None = None

    def host(self, path: str | PurePosixPath) -> Path:
        return self.fs / (self.workdir / path).relative_to("/")


# Stand in for uv's settings in the build stage when it is replayed here: the Python running the tests
# (the image's is python:3.11; any Python uv.lock allows will do), uv's usual link mode (hardlinks
# from its cache: the image's `copy` only matters across Docker layers) and no bytecode compilation
# (it makes the virtualenv no more importable, only slower to build).
REPLAY_ENV = {
    "UV_PYTHON": getattr(sys, "_base_executable", sys.executable),
    "UV_LINK_MODE": "hardlink",
    "UV_COMPILE_BYTECODE": "0",
}
_INHERITED_UNSAFE = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT")


def context_files(source: str, ignore: list[str]) -> list[tuple[PurePosixPath, Path]]:
    """What COPY <source> takes from the build context: (path relative to the source, file)."""
    assert not any(c in source for c in "*?["), f"COPY {source}: wildcards are not replayed"
    root = ROOT / source
    if root.is_file():
        files = [(PurePosixPath(root.name), root)]
    else:
        files = [(PurePosixPath(p.relative_to(root).as_posix()), p) for p in sorted(root.rglob("*")) if p.is_file()]
    files = [(rel, p) for rel, p in files if not dockerignore_excludes(p.relative_to(ROOT).as_posix(), ignore)]
    if not files:
        raise BuildFailed(f"COPY {source}: not in the build context (missing, or hidden by .dockerignore)")
    return files


def contracts_files(source: str, contracts_workdir: PurePosixPath) -> list[tuple[PurePosixPath, Path]]:
    """COPY --from=contracts: what that stage generates is what `make gen` generated here."""
    rel = PurePosixPath(source).relative_to(contracts_workdir).as_posix()
    generated = GENERATED.relative_to(ROOT).as_posix()
    assert rel == generated or rel.startswith(f"{generated}/"), f"the contracts stage makes only {generated}"
    root = ROOT / rel
    assert (GENERATED / "csx" / "py.typed").is_file(), "no generated code: run `make gen`"
    return [
        (PurePosixPath(p.relative_to(root).as_posix()), p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]


def run_step(replay: Replay, args: str, uv: str) -> None:
    argv = json.loads(args) if args.startswith("[") else ["sh", "-c", args]
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_UNSAFE}
    env |= replay.env | replay.variables
    # uv on PATH, and nothing else from its directory (.tools/bin also holds a python and a pip).
    tools = replay.fs.parent / "tools"
    if not (tools / "uv").exists():
        tools.mkdir(parents=True, exist_ok=True)
        (tools / "uv").symlink_to(uv)
    env["PATH"] = os.pathsep.join([str(tools), env.get("PATH", os.defpath)])
    cwd = replay.host(".")
    cwd.mkdir(parents=True, exist_ok=True)
    # From uv's cache when it can (the workspace's own `uv sync` filled it); the package index only
    # for what the cache lacks.
    result = subprocess.run(argv, cwd=cwd, env=env | {"UV_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    if result.returncode and re.search(r"offline|network connectivity is disabled", result.stderr, re.I):
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    replay.log.append(f"RUN {args}\n{result.stdout}{result.stderr}")
    if result.returncode:
        raise BuildFailed(f"RUN {args}\nexit {result.returncode}\n{result.stderr[-4000:]}")


def replay_stage(text: str, stage: str, build_args: Mapping[str, str], fs: Path, uv: str, ignore: list[str]) -> Replay:
    """Run one stage of a Dockerfile into fs: ARG, ENV, WORKDIR, COPY and RUN; the rest does not
    change the filesystem. COPY --from=contracts takes this checkout's generated code, --from=uv
    nothing (uv is this machine's); any other --from is not replayed."""
    all_stages = stages(text)
    contracts_workdir = PurePosixPath("/")
    for keyword, args in all_stages.get("contracts", []):
        if keyword == "WORKDIR":
            contracts_workdir = contracts_workdir / args
    replay = Replay(fs, env=dict(REPLAY_ENV))
    for keyword, args in all_stages[stage]:
        known = replay.variables | replay.env
        if keyword == "ARG":
            name, _, default = args.partition("=")
            replay.variables[name] = build_args.get(name, default)
        elif keyword == "ENV":
            for name, value in env_pairs(args).items():
                replay.env[name] = substitute(value, replay.variables | replay.env, unknown="")
            if "UV_PROJECT_ENVIRONMENT" in replay.env:
                replay.env["UV_PROJECT_ENVIRONMENT"] = str(replay.host(replay.env["UV_PROJECT_ENVIRONMENT"]))
            replay.env |= REPLAY_ENV
        elif keyword == "WORKDIR":
            replay.workdir = replay.workdir / substitute(args, known, unknown="")
        elif keyword == "COPY":
            flags, sources, dest = copy_operands(substitute(args, known, unknown=""))
            into_directory = dest.endswith("/") or len(sources) > 1
            target = replay.host(dest)
            for source in sources:
                origin = flags.get("from")
                if origin == "uv":
                    continue
                if origin == "contracts":
                    files = contracts_files(source, contracts_workdir)
                elif origin is None:
                    files = context_files(source, ignore)
                else:
                    raise AssertionError(f"COPY --from={origin} is not replayed: teach replay_stage about it")
                # A directory's contents go into the destination; a file goes to it, or into it.
                single_file = origin is None and (ROOT / source).is_file()
                for rel, file in files:
                    path = (target / file.name if into_directory else target) if single_file else target / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, path)
        elif keyword == "RUN":
            run_step(replay, args, uv)
    return replay


def rebuild_service(text: str, svc: str, tmp: Path, uv: str, ignore: list[str]) -> Replay:
    """The build stage for --build-arg SERVICE=<svc>, then what the runtime stage keeps of it."""
    replay = replay_stage(text, "build", {"SERVICE": svc}, tmp / "fs", uv, ignore)
    # The runtime image has the virtualenv and not the source tree it was built from.
    shutil.rmtree(replay.host("."))
    return replay


@pytest.fixture(scope="module")
def rebuilt(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ignore_patterns: list[str]
) -> Iterator[dict[str, futures.Future[Replay]]]:
    """The build stage of every service this session tests, replayed in parallel (about 2 s each
    from uv's cache); each test waits for its own."""
    uv = find_uv()
    text = DOCKERFILE.read_text()
    selected = {
        item.callspec.params["svc"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_image_environment_builds_and_imports_the_service"
    }
    root = tmp_path_factory.mktemp("images")
    with futures.ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
        yield {
            svc: pool.submit(build_and_import, text, svc, root / svc, uv, ignore_patterns)
            for svc in SERVICES
            if svc in selected or not selected
        }


IMPORT_CHECK = """
import importlib, importlib.metadata, runpy, sys
from pathlib import Path
svc, venv, health_check = sys.argv[1:]
for name in ("app", "migrate", "__main__"):
    module = importlib.import_module(f"csx_{svc}.{name}")
    assert Path(module.__file__).is_relative_to(venv), module.__file__
(script,) = importlib.metadata.entry_points(group="console_scripts", name=f"csx-{svc}")
assert callable(script.load()), script
runpy.run_path(health_check, run_name="grpc_health_check")
"""


def build_and_import(text: str, svc: str, tmp: Path, uv: str, ignore: list[str]) -> Replay:
    """rebuild_service, then import the service from the virtualenv (in the same worker thread, so
    that the four services' imports run in parallel too)."""
    replay = rebuild_service(text, svc, tmp, uv, ignore)
    venv = replay.env["UV_PROJECT_ENVIRONMENT"]
    replay.imported = subprocess.run(
        [f"{venv}/bin/python", "-I", "-c", IMPORT_CHECK, svc, venv, str(HEALTH_CHECK)],
        cwd=replay.fs,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return replay


@pytest.mark.slow
@pytest.mark.parametrize("svc", SERVICES)
def test_image_environment_builds_and_imports_the_service(svc: str, rebuilt: dict[str, Any]) -> None:
    """The bug this guards against: libs/client (which csx-common depends on) was not copied, so
    `uv sync --frozen --no-dev --package csx-<svc>` failed inside every image build."""
    replay: Replay = rebuilt[svc].result()
    venv = Path(replay.env["UV_PROJECT_ENVIRONMENT"])
    runtime = service_steps(svc)["runtime"]
    # What the runtime stage copies from the build stage exists there.
    for keyword, args in runtime:
        flags, sources, _ = copy_operands(args) if keyword == "COPY" else ({}, [], "")
        if flags.get("from") == "build":
            for source in sources:
                assert (replay.fs / source.lstrip("/")).exists(), f"the build stage makes no {source}"
    # The default command and the Helm chart's (csx-<svc>) are this service's console script, on PATH.
    (path,) = (env_pairs(args)["PATH"] for keyword, args in runtime if keyword == "ENV" and "PATH" in env_pairs(args))
    bin_dirs = [replay.fs / d.lstrip("/") for d in path.split(":") if d.startswith("/")]
    (command,) = (json.loads(args)[0] for keyword, args in runtime if keyword == "CMD")
    for program in (command, f"csx-{svc}"):
        found = [d / program for d in bin_dirs if (d / program).is_file()]
        assert found, f"{program} is not on the image's PATH"
        assert found[0].resolve() == (venv / "bin" / f"csx-{svc}").resolve(), program
    assert replay.imported is not None
    assert replay.imported.returncode == 0, replay.imported.stderr


def test_replay_catches_a_workspace_library_left_out(tmp_path: Path, ignore_patterns: list[str]) -> None:
    """The Dockerfile as it was: nothing from libs/client, which csx-common depends on."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if "COPY libs/client/" not in line)
    assert text != DOCKERFILE.read_text()
    with pytest.raises(BuildFailed, match="libs/client"):
        rebuild_service(text, "panel", tmp_path, find_uv(), ignore_patterns)


# --- .dockerignore --------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out = out[:-2] + "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = _pattern_regex(pattern)
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_build_context_has_what_the_dockerfile_copies(ignore_patterns: list[str]) -> None:
    sources: set[str] = set()
    for svc in SERVICES:
        for steps in service_steps(svc).values():
            for keyword, args in steps:
                flags, copied, _ = copy_operands(args) if keyword == "COPY" else ({}, [], "")
                if "from" not in flags:
                    sources.update(copied)
    for source in sorted(sources):
        root = ROOT / source
        assert root.exists(), source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            assert not dockerignore_excludes(rel, ignore_patterns), (
                f".dockerignore hides {rel}, which the Dockerfile copies"
            )


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".venv/bin/python",
        "var/keyring.json",
        "var/pki/ca.key",
        "deploy/compose/secrets/keyrings/referrals.json",
        "deploy/compose/secrets/pki/ca.key",
        ".git/config",
        "libs/contracts/src/csx/referrals/v1/referrals_pb2.py",
        "libs/common/src/csx_common/__pycache__/db.cpython-311.pyc",
        "libs/cli/src/csx_cli/main.py",
        ".gitignore",
        "tests/conftest.py",
    ],
)
def test_build_context_leaves_out_secrets_and_generated_code(path: str, ignore_patterns: list[str]) -> None:
    assert dockerignore_excludes(path, ignore_patterns)


# --- the health check script --------------------------------------------------------------------------------


def load_health_check() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpc_health_check", HEALTH_CHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from csx_common.pki import DevPki

    return DevPki(tmp_path_factory.mktemp("pki")).ensure()


@pytest.fixture(scope="module")
def health_server(pki: Any) -> Any:
    """A gRPC server with the health service on a mutual-TLS port, like a CSX service's."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from csx_common.pki import PeerIdentity

    creds = pki.credentials(PeerIdentity("service", "panel"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True),
    )
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("csx.panel.v1.PanelService", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("csx.panel.v1.Draining", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    yield port
    server.stop(0)


def service_env(pki: Any, port: int, service: str = "panel") -> dict[str, str]:
    from csx_common.pki import PeerIdentity

    peer = PeerIdentity("service", service)
    prefix = f"CSX_{service.upper()}_"
    return {
        f"{prefix}GRPC_ADDRESS": f"0.0.0.0:{port}",
        f"{prefix}TLS_CA_FILE": str(pki.ca_file),
        f"{prefix}TLS_CERT_FILE": str(pki.cert_file(peer)),
        f"{prefix}TLS_KEY_FILE": str(pki.key_file(peer)),
        "OTEL_SERVICE_NAME": f"csx-{service}",
    }


def test_health_check_from_the_service_s_own_environment(pki: Any, health_server: int, capsys: Any) -> None:
    """As in the compose health check: no arguments, the container's env."""
    check = load_health_check()
    assert check.main([], env=service_env(pki, health_server)) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert check.main(["--service", "csx.panel.v1.PanelService"], env=service_env(pki, health_server)) == 0
    assert check.main(["--service", "csx.panel.v1.Draining"], env=service_env(pki, health_server)) == 1
    assert "NOT_SERVING" in capsys.readouterr().out
    assert check.main(["--service", "csx.panel.v1.Nothing"], env=service_env(pki, health_server)) == 1
    assert "SERVICE_UNKNOWN" in capsys.readouterr().out


def test_health_check_with_explicit_files_as_in_helm_test(pki: Any, health_server: int) -> None:
    from csx_common.pki import PeerIdentity

    check = load_health_check()
    peer = PeerIdentity("service", "panel")
    args = [
        "--address", f"127.0.0.1:{health_server}",
        "--ca", str(pki.ca_file), "--cert", str(pki.cert_file(peer)), "--key", str(pki.key_file(peer)),
        "--server-name", "csx-panel",
    ]  # fmt: skip
    assert check.main(args, env={}) == 0


def test_health_check_fails_without_the_right_credentials(pki: Any, health_server: int, tmp_path: Path) -> None:
    from csx_common.pki import DevPki

    check = load_health_check()
    # Plaintext against a mutual-TLS port.
    assert check.main(["--address", f"127.0.0.1:{health_server}", "--timeout", "1"], env={}) == 1
    # A certificate from another CA.
    other = DevPki(tmp_path / "other").ensure()
    assert check.main(["--timeout", "1"], env=service_env(other, health_server)) == 1
    # Nothing listening.
    assert check.main(["--address", "127.0.0.1:1", "--timeout", "1"], env={}) == 1


def test_health_check_in_insecure_development_mode() -> None:
    check = load_health_check()
    env = {"CSX_PANEL_GRPC_ADDRESS": "127.0.0.1:50999", "CSX_PANEL_INSECURE_DEV": "true", "CSX_PANEL_TLS_CA_FILE": "x"}
    import argparse

    target = check.target_from(argparse.Namespace(address="", ca="", cert="", key="", server_name=""), env)
    assert target.address == "127.0.0.1:50999" and not target.secure
