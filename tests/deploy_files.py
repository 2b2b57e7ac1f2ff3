"""What tests/test_deploy.py and tests/test_cluster.py share: the shipped deploy files read and
rendered for processes on this machine (compose's `${VAR:-default}` interpolation, NATS configs
with free ports and temporary stores)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Mapping

import yaml

from chatfabric.proto.auth import new_password, password_env
from chatfabric.proto.embedded import find_nats_server
from chatfabric.proto.roles import ROLES

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NATS_DIR = DEPLOY / "nats"
COMPOSE = DEPLOY / "compose.yaml"

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value, env: Mapping[str, str]):
    """Compose's `${VAR}` / `${VAR:-default}` in every string of `value` (defaults as compose
    reads them here: an unset or empty variable takes the default)."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(env: Mapping[str, str]) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def command_of(service: dict) -> list[str]:
    """A service's command as a list: compose splits the string form like a shell."""
    import shlex

    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def role_passwords() -> dict[str, str]:
    """Fresh passwords for every role, as the environment the shipped configs read."""
    return {password_env(name): new_password() for name in ROLES}


def render_nats_config(source: Path, folder: Path, replacements: Mapping[str, str]) -> Path:
    """`source` with each key replaced by its value, written beside a copy of permissions.conf
    (which it includes); fails if a key is not in the file, so the shipped file stays what the
    test runs."""
    text = source.read_text()
    for old, new in replacements.items():
        assert old in text, f"{source.name} no longer holds {old!r}: update the test"
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(NATS_DIR / "permissions.conf", folder / "permissions.conf")
    path = folder / source.name
    path.write_text(text)
    return path


def start_nats(config: Path, env: Mapping[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    try:
        return subprocess.Popen([find_nats_server(), "-c", str(config)], env=dict(env), stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        out.close()
