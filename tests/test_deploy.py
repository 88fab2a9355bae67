"""docker-compose.yml stays valid and runs real commands (no Docker engine runs here)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            env={"APA_ADMIN_TOKEN": "t", "APA_HMAC_KEY": "k", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_compose_services_run_real_commands() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"postgres", "redis", "migrate", "gateway", "worker"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    cli = get_command(app)
    for name in ("migrate", "gateway", "worker"):
        command = services[name]["command"]
        group = cli
        for word in command:
            if word.startswith("-"):
                break
            group = group.commands[word]  # type: ignore[attr-defined]
    assert (ROOT / services["gateway"]["build"]["dockerfile"]).is_file()


def test_dockerfile_is_multi_stage_non_root_non_editable_with_a_healthcheck() -> None:
    dockerfile = ROOT / services_dockerfile()
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert sum(line.startswith("FROM ") for line in lines) >= 2
    assert any(line.startswith("COPY --from=") for line in lines)
    assert not any("-e ." in line or "--editable" in line for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert any("APA_MIGRATIONS_DIR=" in line for line in lines), "an installed package needs the migrations' path"


def test_the_dockerignore_is_the_one_buildkit_reads() -> None:
    dockerfile = ROOT / services_dockerfile()
    context = ROOT / yaml.safe_load(COMPOSE.read_text())["x-apa"]["build"]["context"]
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile first, else <context>/.dockerignore
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.is_file():
        ignore = context / ".dockerignore"
    patterns = set(ignore.read_text().split())
    assert {".git", ".venv", "var"} <= patterns


def services_dockerfile() -> str:
    return yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]["build"]["dockerfile"]


def test_the_version_is_written_once_in_pyproject() -> None:
    from importlib.metadata import version

    import apa

    assert apa.__version__ == version("apa-rec")
    import re

    sources = [path for path in (ROOT / "apa").rglob("*.py") if re.search(r'__version__ = "\d+\.\d', path.read_text())]
    assert not sources, f"a hard-coded version in {sources}"
    assert (ROOT / "apa" / "py.typed").is_file()
