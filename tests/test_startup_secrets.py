"""Secrets made at start: the session key file and the first admin's generated
password, and how `serve` learns the real client address behind a proxy."""

import io
import logging
import os
import stat

from app import cli, main
from app.config import Settings


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_secret_key_file_is_private_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        key = main.session_secret(Settings(data_dir=tmp_path, secret_key=None))
    finally:
        os.umask(old)
    path = tmp_path / "secret_key"
    assert _mode(path) == 0o600
    assert path.read_text() == key and len(key) >= 64
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]  # no temporary file left behind
    assert main.session_secret(Settings(data_dir=tmp_path, secret_key=None)) == key


def test_replica_that_loses_the_race_uses_the_winners_key(tmp_path, monkeypatch):
    path = tmp_path / "secret_key"
    real_token = main.secrets.token_urlsafe

    def other_replica_writes_first(n: int) -> str:
        # Another replica saw no file either and finished writing its key first.
        path.write_text("key-of-the-other-replica")
        return real_token(n)

    monkeypatch.setattr(main.secrets, "token_urlsafe", other_replica_writes_first)
    assert main.session_secret(Settings(data_dir=tmp_path, secret_key=None)) == "key-of-the-other-replica"
    assert path.read_text() == "key-of-the-other-replica"


def test_generated_admin_password_goes_to_a_private_file_when_stdout_is_no_terminal(tmp_path, monkeypatch, caplog,
                                                                                     capsys):
    monkeypatch.setattr(cli.sys, "stdout", io.StringIO())  # as under docker or systemd
    with caplog.at_level(logging.INFO):
        cli._announce_first_admin("admin", "generated-pw-123", Settings(data_dir=tmp_path))
    path = tmp_path / cli.ADMIN_PASSWORD_FILE
    assert path.read_text().strip() == "generated-pw-123"
    assert _mode(path) == 0o600
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(path.resolve()) in logged
    assert "generated-pw-123" not in logged + cli.sys.stdout.getvalue() + capsys.readouterr().out


def test_generated_admin_password_is_printed_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(cli.sys, "stdout", terminal)
    cli._announce_first_admin("admin", "generated-pw-123", Settings(data_dir=tmp_path))
    assert "generated-pw-123" in terminal.getvalue()
    assert not (tmp_path / cli.ADMIN_PASSWORD_FILE).exists()


def test_serve_believes_forwarded_headers_only_from_the_configured_proxies(monkeypatch):
    monkeypatch.delenv("RLHF_FORWARDED_ALLOW_IPS", raising=False)
    options = cli.uvicorn_options(Settings(_env_file=None))
    assert options["proxy_headers"] is True and options["forwarded_allow_ips"] == "127.0.0.1"
    monkeypatch.setenv("RLHF_FORWARDED_ALLOW_IPS", "10.1.2.3,192.168.0.0/16")
    assert cli.uvicorn_options(Settings(_env_file=None))["forwarded_allow_ips"] == "10.1.2.3,192.168.0.0/16"
