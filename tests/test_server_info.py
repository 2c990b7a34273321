"""`rtv-db server info` and `server url`: where the embedded server listens, for other tools."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from rtv_db.cli import cli
from rtv_db.server import EmbeddedServer


@pytest.fixture()
def data_dir():
    path = Path(tempfile.mkdtemp(prefix="rtv-db-test-"))
    yield path
    EmbeddedServer(path).stop()
    shutil.rmtree(path, ignore_errors=True)


def test_server_info_and_url(data_dir) -> None:
    runner = CliRunner()
    env = {"RTV_DB_DATA_DIR": str(data_dir), "DATABASE_URL": "", "RTV_DB_ADMIN_URL": ""}
    stopped = runner.invoke(cli, ["server", "info"], env=env)
    assert stopped.exit_code == 1 and "not running" in stopped.output
    assert runner.invoke(cli, ["server", "start"], env=env).exit_code == 0
    result = runner.invoke(cli, ["server", "info", "--json"], env=env)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert isinstance(info["port"], int) and info["port"] > 0
    assert Path(info["socket"]).name == f".s.PGSQL.{info['port']}" and Path(info["socket"]).exists()
    assert info["host"] == info["socket_dir"] and Path(info["socket_dir"]).is_dir()
    assert info["runtime_role"] == "rtv_app"
    runtime = make_url(info["runtime_url"])
    assert runtime.username == "rtv_app" and runtime.drivername == "postgresql"  # libpq form, for any tool
    assert runtime.query["host"] == info["socket_dir"] and runtime.query["port"] == str(info["port"])
    with psycopg.connect(info["admin_url"]) as conn:  # the URLs work as printed
        assert conn.execute("SHOW port").fetchone()[0] == str(info["port"])
    text = runner.invoke(cli, ["server", "info"], env=env)
    assert text.exit_code == 0 and "port" in text.output and info["runtime_url"] in text.output
    url = runner.invoke(cli, ["server", "url", "--role", "runtime"], env=env)
    assert url.exit_code == 0 and f"port={info['port']}" in url.output and "host=" in url.output
