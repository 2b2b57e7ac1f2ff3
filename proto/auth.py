"""Who may join the bus: credentials on both sides of a NATS connection.

- A process presents a `NatsAuth`: user and password, a token, a `.creds` file or an nkey seed,
  and optionally TLS files; flags (`add_auth_args`) and the official `nats` CLI's environment
  variables fill it, and `connect_options(role)` turns it into nats-py's `Client.connect`
  keyword arguments, the role's inbox prefix included.
- The server knows one user per role (`roles.ROLES`): `render_authorization` writes the
  `authorization { users = [...] }` block of a nats-server config, with given passwords (the
  embedded server) or with `$CHATFABRIC_<ROLE>_PASSWORD` variables (`deploy/nats/`);
  `ensure_credentials` keeps one random password per role in a private file, and
  `join_instructions` tells a machine elsewhere how to join with them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from .files import write_atomic
from .roles import ROLES, Role, role

log = logging.getLogger(__name__)

# -- the server's authorization block ------------------------------------------------------------


def password_env(role_name: str) -> str:
    """The environment variable the shipped config reads a role's password from."""
    return f"CHATFABRIC_{role_name.upper()}_PASSWORD"


# Characters a password may hold inside a quoted config string (bcrypt hashes included).
_PASSWORD_CHARS = frozenset(string.ascii_letters + string.digits + "_-.$/+=~!@%^&*()[]{}:;,?<>|")


def render_authorization(passwords: Mapping[str, str] | None = None, *, from_env: bool = False,
                         roles: Mapping[str, Role] | None = None) -> str:
    """The `authorization { users = [...] }` block for nats-server: one user per role, named
    after the role.

    With `passwords` (role -> password, for the roles to include), each is written quoted as
    given: a plain password, or a bcrypt hash (`$2a$...`, e.g. from `nats server passwd`), which
    nats-server recognizes by its prefix. chatfabric itself writes plain passwords, kept in a
    0600 file inside a 0700 folder (the launcher needs them in clear to connect anyway).
    With `from_env=True`, every role is included and its password is the unquoted variable
    `$CHATFABRIC_<ROLE>_PASSWORD`, resolved by nats-server from its environment when it starts
    (a missing variable stops it). The value is parsed as config: a bare number, `true` or a
    `$`-prefixed bcrypt hash must be wrapped in double quotes inside the variable.
    """
    roles = roles if roles is not None else ROLES
    if from_env == (passwords is not None):
        raise ValueError("give either passwords or from_env=True")
    names = list(roles) if from_env else [name for name in roles if name in passwords]
    if not from_env and set(passwords) - set(roles):
        raise ValueError(f"passwords for unknown roles: {', '.join(sorted(set(passwords) - set(roles)))}")
    lines = ["authorization {", "  users = ["]
    for name in names:
        secret = f"${password_env(name)}" if from_env else _quoted_password(name, passwords[name])
        lines += _render_user(roles[name], secret)
    return "\n".join([*lines, "  ]", "}", ""])


def _quoted_password(role_name: str, password: str) -> str:
    if not password or not set(password) <= _PASSWORD_CHARS:
        raise ValueError(f"the {role_name} password must be non-empty and printable, without quotes, "
                         "backslashes, '#' or spaces")
    return f'"{password}"'


def _render_user(r: Role, secret: str) -> list[str]:
    lines = ["    {", f'      user: "{r.name}"', f"      password: {secret}", "      permissions: {"]
    for direction, perms in (("publish", r.publish), ("subscribe", r.subscribe)):
        lines.append(f"        {direction}: {{")
        for kind, items in (("allow", perms.allow), ("deny", perms.deny)):
            if items:
                lines += [f"          {kind}: [", *(f'            "{s}"' for s in items), "          ]"]
        lines.append("        }")
    if r.allow_responses:
        lines.append("        allow_responses: true")
    return lines + ["      }", "    }"]


# -- generated credentials ------------------------------------------------------------------------

CREDENTIALS_FILE = "nats-credentials.json"
_ALPHABET = string.ascii_letters + string.digits


def new_password() -> str:
    """32 random letters and digits (~190 bits), starting with a letter: a value nats-server
    reads as a string even unquoted, from an environment variable (a bare number would not)."""
    return secrets.choice(string.ascii_letters) + "".join(secrets.choice(_ALPHABET) for _ in range(31))


def ensure_credentials(folder: Path, roles: Mapping[str, Role] | None = None) -> dict[str, str]:
    """Role -> password, created at random once and kept in `folder/nats-credentials.json`
    (mode 0600, folder 0700); later calls return the same passwords (adding any new role's).
    A file found readable by others is made private again, with a warning."""
    roles = roles if roles is not None else ROLES
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / CREDENTIALS_FILE
    stored = _read_credentials(path) if path.exists() else {}
    missing = [name for name in roles if name not in stored]
    if missing:
        stored.update({name: new_password() for name in missing})
        write_private(path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    return {name: stored[name] for name in roles}


def _read_credentials(path: Path) -> dict[str, str]:
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by other users; made private (delete it to get new passwords)", path)
        path.chmod(0o600)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err}); delete it to generate new credentials") from None
    if not isinstance(stored, dict) or not all(isinstance(v, str) and v for v in stored.values()):
        raise ValueError(f"{path} is not a role -> password map; delete it to generate new credentials")
    return stored


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (mode 0600 from the first byte)."""
    write_atomic(path, text, mode=0o600)


def binds_beyond_loopback(host: str) -> bool:
    """True when a server listening on `host` is reachable from other machines."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: assume it resolves to a reachable address


def role_env(role_name: str, password: str, url: str | None = None) -> dict[str, str]:
    """The environment a process needs to join as `role_name` (the `nats` CLI's variable names)."""
    env = {"NATS_USER": role_name, "NATS_PASSWORD": password}
    return {"NATS_URL": url, **env} if url else env


def join_instructions(url: str, passwords: Mapping[str, str], credentials_file: Path | None = None,
                      role_name: str = "worker") -> str:
    """How a process on another machine joins a secured fabric: the lines to print.

    A wildcard host in `url` (0.0.0.0, ::) is replaced by this machine's host name."""
    parts = urlsplit(url)
    if parts.hostname in ("0.0.0.0", "::", ""):
        parts = parts._replace(netloc=f"{socket.gethostname()}:{parts.port}")
    env = role_env(role_name, passwords[role_name], urlunsplit(parts))
    lines = [f"NATS requires credentials. A {role_name} on another machine joins with:"]
    lines += [f"  export {key}={value}" for key, value in env.items()]
    lines.append(f"  chatfabric {role_name} ..." if role_name != "worker" else "  chatfabric worker --model-path PATH")
    if credentials_file is not None:
        lines.append(f"Passwords of every role: {credentials_file} (keep it private).")
    return "\n".join(lines)


# -- the client side ----------------------------------------------------------------------------

# Flag -> environment variable: the official `nats` CLI's names.
ENV_VARS = {
    "user": "NATS_USER",
    "password": "NATS_PASSWORD",
    "token": "NATS_TOKEN",
    "creds": "NATS_CREDS",
    "nkey": "NATS_NKEY",
    "ca": "NATS_CA",
    "cert": "NATS_CERT",
    "key": "NATS_KEY",
}
_FILES = ("creds", "nkey", "ca", "cert", "key")


class NatsAuthError(ValueError):
    """The credentials or TLS settings cannot work; the message lists every problem."""


@dataclass(frozen=True)
class NatsAuth:
    """What a process presents to NATS: at most one of user/password, token, a `.creds` file
    (JWT + nkey seed) or an nkey seed file; optionally TLS (a CA to verify the server, a client
    certificate and key). Checked when built; `connect_options(role)` gives nats-py's options."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: Path | None = None
    nkey: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        for name in ENV_VARS:
            value = getattr(self, name)
            if value == "":
                object.__setattr__(self, name, None)
            elif name in _FILES and value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        problems = self.problems()
        if problems:
            raise NatsAuthError("NATS credentials: " + "; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "NatsAuth":
        environ = os.environ if environ is None else environ
        return cls(**{name: environ.get(var) or None for name, var in ENV_VARS.items()})

    @classmethod
    def for_role(cls, role_name: str, passwords: Mapping[str, str], **tls: Path) -> "NatsAuth":
        """The role's user and generated password (see `ensure_credentials`)."""
        return cls(user=role(role_name).name, password=passwords[role_name], **tls)

    def problems(self) -> list[str]:
        found = []
        kinds = [kind for kind, set_ in (("user/password", self.user or self.password), ("token", self.token),
                                         ("creds file", self.creds), ("nkey seed", self.nkey)) if set_]
        if len(kinds) > 1:
            found.append(f"use one way to authenticate, not {' and '.join(kinds)}")
        if bool(self.user) != bool(self.password):
            found.append("--nats-user and --nats-password (NATS_USER, NATS_PASSWORD) go together")
        if bool(self.cert) != bool(self.key):
            found.append("a client certificate needs its key and a key its certificate "
                         "(--nats-cert with --nats-key; NATS_CERT, NATS_KEY)")
        for name in _FILES:
            path = getattr(self, name)
            if path is not None and not path.is_file():
                found.append(f"{ENV_VARS[name]} / --nats-{name}: no such file: {path}")
        if (self.creds or self.nkey) and not _has_nkeys():
            found.append("a creds or nkey file needs the 'nkeys' package: pip install 'nats-py[nkeys]'")
        return found

    @property
    def uses_tls(self) -> bool:
        return any((self.ca, self.cert, self.key))

    def ssl_context(self) -> ssl.SSLContext | None:
        """Verifies the server (against `ca`, or the system's CAs) and presents the client
        certificate if one is set; None when no TLS option is set."""
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            if self.cert:
                context.load_cert_chain(str(self.cert), str(self.key), password=lambda: b"")
        except (ssl.SSLError, OSError) as err:
            raise NatsAuthError(f"NATS TLS files: {err} (CA {self.ca}, certificate {self.cert}, key {self.key}; "
                                "keys must be PEM and not encrypted)") from None
        return context

    def connect_options(self, role_name: str) -> dict:
        """Keyword arguments for nats-py's `Client.connect`, for a process of `role_name`."""
        options: dict = {"inbox_prefix": role(role_name).inbox_prefix}
        if self.user:
            options.update(user=self.user, password=self.password)
        if self.token:
            options["token"] = self.token
        if self.creds:
            options["user_credentials"] = str(self.creds)
        if self.nkey:
            options["nkeys_seed"] = str(self.nkey)
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        return options

    def describe(self) -> str:
        """For logs: how this process authenticates, without secrets."""
        how = (f"user {self.user!r}" if self.user else "a token" if self.token else
               f"creds {self.creds}" if self.creds else f"nkey {self.nkey}" if self.nkey else "no credentials")
        return how + (", TLS" if self.uses_tls else "")


def _has_nkeys() -> bool:
    try:
        import nkeys  # noqa: F401
    except ImportError:
        return False
    return True


def add_auth_args(parser: argparse.ArgumentParser) -> None:
    """--nats-user ... --nats-key, each defaulting to the `nats` CLI's environment variable."""
    g = parser.add_argument_group(
        "NATS credentials and TLS",
        "each defaults to the environment variable the nats CLI uses; prefer the variables for "
        "secrets (command lines are visible to other users of the machine)",
    )
    helps = {
        "user": "user name (a role: gateway, worker, ...)",
        "password": "password of --nats-user",
        "token": "authentication token",
        "creds": "credentials file (.creds: JWT and nkey seed)",
        "nkey": "nkey seed file",
        "ca": "CA certificate(s) to verify the server (PEM)",
        "cert": "client certificate (PEM), with --nats-key",
        "key": "client certificate's private key (PEM)",
    }
    for name, var in ENV_VARS.items():
        g.add_argument(f"--nats-{name}", default=os.environ.get(var) or None, metavar=name.upper(),
                       help=f"{helps[name]} (default: ${var})")


def auth_from_args(args: argparse.Namespace) -> NatsAuth:
    """The `NatsAuth` of parsed `add_auth_args` flags; raises NatsAuthError naming what is wrong."""
    return NatsAuth(**{name: getattr(args, f"nats_{name}") for name in ENV_VARS})


def main(argv: list[str] | None = None) -> int:
    """`python -m chatfabric.proto.auth render` prints the shipped permissions file;
    `passwords` prints fresh passwords as `export` lines for the shipped config's variables."""
    parser = argparse.ArgumentParser(prog="python -m chatfabric.proto.auth")
    parser.add_argument("what", choices=["render", "passwords"])
    args = parser.parse_args(argv)
    if args.what == "render":
        sys.stdout.write(SHIPPED_HEADER + render_authorization(from_env=True))
    else:
        for name in ROLES:
            print(f"export {password_env(name)}={new_password()}")
    return 0


SHIPPED_HEADER = """\
# The chatfabric roles as NATS users (docs/security.md), with passwords from the environment:
# CHATFABRIC_<ROLE>_PASSWORD for each role. nats-server parses each value as config: letters and
# digits starting with a letter read as a string; wrap anything else in double quotes inside the
# variable, e.g. a bcrypt hash from `nats server passwd`: CHATFABRIC_WORKER_PASSWORD='"$2a$11$..."'.
# Generated: `python -m chatfabric.proto.auth render > deploy/nats/permissions.conf`; edit the
# roles in proto/roles.py, not here (a test keeps the two equal).
"""


if __name__ == "__main__":
    sys.exit(main())
