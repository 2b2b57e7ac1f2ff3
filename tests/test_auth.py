"""proto/auth.py without a server: credentials and TLS options, flags and environment, the
generated passwords file, the rendered authorization block and the role table's invariants.
(`test_security.py` checks the permissions against a real nats-server.)"""

from __future__ import annotations

import argparse
import logging
import ssl
import stat

import pytest

from chatfabric.proto import auth, roles


def test_from_env_reads_the_nats_cli_variables(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    env = {"NATS_USER": "worker", "NATS_PASSWORD": "pw", "NATS_CA": str(ca), "NATS_TOKEN": ""}
    got = auth.NatsAuth.from_env(env)
    assert (got.user, got.password, got.token, got.ca) == ("worker", "pw", None, ca)
    assert auth.NatsAuth.from_env({}) == auth.NatsAuth()


@pytest.mark.parametrize("kwargs, problem", [
    ({"user": "worker"}, "--nats-user and --nats-password"),
    ({"password": "pw"}, "--nats-user and --nats-password"),
    ({"user": "u", "password": "p", "token": "t"}, "use one way to authenticate, not user/password and token"),
    ({"cert": "CERT"}, "a client certificate needs its key"),
    ({"ca": "/no/such/ca.pem"}, "NATS_CA / --nats-ca: no such file: /no/such/ca.pem"),
])
def test_problems_are_named(tmp_path, kwargs, problem):
    if kwargs.get("cert") == "CERT":
        kwargs["cert"] = tmp_path / "c.pem"
        kwargs["cert"].write_text("x")
    with pytest.raises(auth.NatsAuthError, match=problem.replace("/", ".").replace("(", r"\(")):
        auth.NatsAuth(**kwargs)


def test_creds_without_the_nkeys_package_says_what_to_install(tmp_path, monkeypatch):
    creds = tmp_path / "u.creds"
    creds.write_text("x")
    monkeypatch.setattr(auth, "_has_nkeys", lambda: False)
    with pytest.raises(auth.NatsAuthError, match=r"pip install 'nats-py\[nkeys\]'"):
        auth.NatsAuth(creds=creds)


def test_connect_options_carry_credentials_and_the_roles_inbox_prefix():
    options = auth.NatsAuth(user="worker", password="pw").connect_options("worker")
    assert options == {"user": "worker", "password": "pw", "inbox_prefix": "_INBOX_worker"}
    assert auth.NatsAuth(user="worker", password="pw").describe() == "user 'worker'"
    assert auth.NatsAuth(token="t").connect_options("gateway") == {"token": "t", "inbox_prefix": "_INBOX_gateway"}
    with pytest.raises(ValueError, match="unknown role 'nobody'"):
        auth.NatsAuth().connect_options("nobody")


def test_tls_options_become_a_verifying_ssl_context(tmp_path):
    # The system's CA bundle stands in for a private CA file: any PEM file of certificates loads.
    bundle = ssl.get_default_verify_paths().cafile
    if bundle is None:
        pytest.skip("no system CA bundle file")
    context = auth.NatsAuth(ca=bundle).connect_options("worker")["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(auth.NatsAuthError, match="NATS TLS files"):
        auth.NatsAuth(ca=bad).connect_options("worker")


def test_flags_default_to_the_environment_and_override_it(monkeypatch):
    monkeypatch.setenv("NATS_USER", "worker")
    monkeypatch.setenv("NATS_PASSWORD", "from-env")
    parser = argparse.ArgumentParser()
    auth.add_auth_args(parser)
    assert auth.auth_from_args(parser.parse_args([])) == auth.NatsAuth(user="worker", password="from-env")
    args = parser.parse_args(["--nats-user", "gateway", "--nats-password", "flag"])
    assert auth.auth_from_args(args) == auth.NatsAuth(user="gateway", password="flag")
    assert "from-env" not in parser.format_help()
    assert "from-env" not in repr(auth.auth_from_args(parser.parse_args([])))


def test_credentials_are_created_once_privately_and_reused(tmp_path):
    folder = tmp_path / "data"
    first = auth.ensure_credentials(folder)
    assert set(first) == set(roles.ROLES)
    assert len(set(first.values())) == len(first)
    path = folder / auth.CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert auth.ensure_credentials(folder) == first


def test_a_new_role_gets_a_password_and_the_old_ones_stay(tmp_path):
    few = {name: roles.ROLES[name] for name in ("gateway", "worker")}
    old = auth.ensure_credentials(tmp_path, roles=few)
    every = auth.ensure_credentials(tmp_path)
    assert {name: every[name] for name in few} == old and set(every) == set(roles.ROLES)


def test_a_credentials_file_readable_by_others_is_made_private(tmp_path, caplog):
    auth.ensure_credentials(tmp_path)
    path = tmp_path / auth.CREDENTIALS_FILE
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        auth.ensure_credentials(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "readable by other users" in caplog.text


def test_a_broken_credentials_file_is_named(tmp_path):
    (tmp_path / auth.CREDENTIALS_FILE).write_text("{not json")
    (tmp_path / auth.CREDENTIALS_FILE).chmod(0o600)
    with pytest.raises(ValueError, match="delete it to generate new credentials"):
        auth.ensure_credentials(tmp_path)


def test_new_passwords_read_as_strings_in_a_config():
    passwords = {auth.new_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) == 32 and p[0].isalpha() and p.isalnum() for p in passwords)


def test_render_writes_one_user_per_role():
    text = auth.render_authorization({"gateway": "g" * 10, "worker": "w" * 10})
    assert text.startswith("authorization {") and text.count("user: ") == 2
    assert 'password: "wwwwwwwwww"' in text and '"_INBOX_worker.>"' in text
    from_env = auth.render_authorization(from_env=True)
    assert from_env.count("user: ") == len(roles.ROLES)
    assert "password: $CHATFABRIC_TRAINER_PASSWORD\n" in from_env


@pytest.mark.parametrize("call, message", [
    (lambda: auth.render_authorization({"worker": 'a"b'}), "without quotes"),
    (lambda: auth.render_authorization({"worker": ""}), "non-empty"),
    (lambda: auth.render_authorization({"root": "pw"}), "unknown roles: root"),
    (lambda: auth.render_authorization(), "either passwords or from_env"),
    (lambda: auth.render_authorization({"worker": "pw"}, from_env=True), "either passwords or from_env"),
])
def test_render_refuses_what_would_break_the_config(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_roles_keep_to_their_own_inboxes():
    prefixes = [r.inbox_prefix for r in roles.ROLES.values()]
    assert len(set(prefixes)) == len(prefixes)
    for r in roles.ROLES.values():
        if r.name == "admin":
            continue
        assert f"{r.inbox_prefix}.>" in r.subscribe.allow
        others = {f"{p}.>" for p in prefixes} - {f"{r.inbox_prefix}.>"}
        assert not others & set(r.subscribe.allow), r.name
        assert "gen.>" not in r.subscribe.allow and ">" not in r.publish.allow
        assert not set(r.publish.allow) & set(r.publish.deny), r.name
    token_plane_readers = [r.name for r in roles.ROLES.values() if "_INBOX.cf.>" in r.subscribe.allow]
    assert token_plane_readers == ["gateway"]


def test_binds_beyond_loopback():
    assert not any(map(auth.binds_beyond_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert all(map(auth.binds_beyond_loopback, ["0.0.0.0", "::", "10.1.2.3", "nats.example.com"]))


def test_join_instructions_name_the_variables(tmp_path, monkeypatch):
    monkeypatch.setattr(auth.socket, "gethostname", lambda: "box")
    text = auth.join_instructions("nats://0.0.0.0:4222", {"worker": "pw"}, tmp_path / "creds.json")
    assert "export NATS_URL=nats://box:4222" in text
    assert "export NATS_USER=worker" in text and "export NATS_PASSWORD=pw" in text
    assert "chatfabric worker --model-path PATH" in text and str(tmp_path / "creds.json") in text


def test_module_renders_the_shipped_file(capsys):
    assert auth.main(["render"]) == 0
    assert capsys.readouterr().out == auth.SHIPPED_HEADER + auth.render_authorization(from_env=True)
