"""The service images (services/*/Dockerfile, .dockerignore) and the health check they ship.

No Docker engine here, so the Dockerfiles are checked as text: one recipe for all four services,
multi-stage, non-root, nothing the build needs hidden by .dockerignore and nothing secret sent in
the build context. The health check script runs for real against a gRPC server with mutual TLS."""

from __future__ import annotations

import re
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import ROOT, SERVICES

DOCKERFILES = {svc: ROOT / "services" / svc / "Dockerfile" for svc in SERVICES}
HEALTH_CHECK = ROOT / "deploy" / "docker" / "grpc_health_check.py"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def test_one_recipe_for_every_service() -> None:
    def generic(svc: str) -> str:
        # The workspace members' pyproject.toml files are copied by every Dockerfile alike.
        lines = [
            line
            for line in DOCKERFILES[svc].read_text().splitlines()
            if not re.fullmatch(r"COPY services/\w+/pyproject.toml services/\w+/", line)
        ]
        return "\n".join(lines).replace(svc, "<svc>")

    for svc in SERVICES:
        assert generic(svc) == generic("referrals"), (
            f"services/{svc}/Dockerfile differs from referrals' beyond the name"
        )
        for member in SERVICES:
            assert f"COPY services/{member}/pyproject.toml services/{member}/" in DOCKERFILES[svc].read_text()


@pytest.mark.parametrize("svc", SERVICES)
def test_dockerfile_builds_only_this_service_and_runs_as_non_root(svc: str) -> None:
    steps = instructions(DOCKERFILES[svc])
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) >= 3, "contracts, build and runtime stages"
    final = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    runtime = steps[final:]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users == ["10001:10001"]
    assert ("CMD", f'["csx-{svc}"]') in runtime
    runtime_copies = [args for keyword, args in runtime if keyword == "COPY"]
    # The runtime stage takes only the built virtualenv and the health check.
    assert runtime_copies == [
        "--from=build /opt/csx/venv /opt/csx/venv",
        "deploy/docker/grpc_health_check.py /opt/csx/grpc_health_check.py",
    ]
    syncs = [args for keyword, args in steps if keyword == "RUN" and "uv sync" in args]
    assert syncs and all(f"--package csx-{svc}" in s and "--frozen" in s and "--no-dev" in s for s in syncs)
    assert any("--no-editable" in s for s in syncs)
    sources = [args.split()[0] for keyword, args in steps if keyword == "COPY" and not args.startswith("--from")]
    for other in SERVICES:
        if other != svc:
            assert f"services/{other}/src" not in " ".join(sources)
    assert "libs/cli/src" not in " ".join(sources)
    # The migration entry point the compose step and the Helm Job run exists.
    assert (ROOT / "services" / svc / "src" / f"csx_{svc}" / "migrate.py").is_file()


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


def test_build_context_has_what_the_dockerfiles_copy(ignore_patterns: list[str]) -> None:
    sources: set[str] = set()
    for path in DOCKERFILES.values():
        for keyword, args in instructions(path):
            if keyword == "COPY" and not args.startswith("--from"):
                sources.update(args.split()[:-1])
    for source in sorted(sources):
        root = ROOT / source
        assert root.exists(), source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            assert not dockerignore_excludes(rel, ignore_patterns), (
                f".dockerignore hides {rel}, which a Dockerfile copies"
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
