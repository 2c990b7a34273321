"""The embedded server: start, reuse, stop, and recovery from a killed owner process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import psycopg
import pytest
from click.testing import CliRunner

from rtv_db.cli import cli
from rtv_db.server import EmbeddedServer


def _postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(attrs=["name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "postgres" and any(str(pgdata) in part for part in cmdline):
            found.append(proc)
    return found


@pytest.fixture()
def data_dir():
    # Outside pytest's tmp_path, which a concurrently starting pytest may delete.
    path = Path(tempfile.mkdtemp(prefix="rtv-db-test-"))
    yield path
    EmbeddedServer(path).stop()
    shutil.rmtree(path, ignore_errors=True)


def test_start_is_idempotent_and_stop_stops(data_dir):
    server = EmbeddedServer(data_dir)
    assert not server.status().running
    url = server.start()
    first = server.status()
    assert first.running
    assert server.start() == url  # reused, not a second server
    assert server.status().pid == first.pid
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        assert conn.execute("select current_database()").fetchone()[0] == "rtv"
    assert server.stop()
    assert not server.status().running
    assert not server.stop()
    assert _postgres_processes(server.pgdata) == []


def test_server_of_a_killed_process_is_found_and_reused(data_dir):
    script = textwrap.dedent(
        f"""
        import sys, time
        from rtv_db.server import EmbeddedServer
        EmbeddedServer({str(data_dir)!r}).start()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)  # the owner dies without any cleanup
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    server = EmbeddedServer(data_dir)
    left_behind = server.status()
    assert left_behind.running, "the server outlives the killed process"
    server.start()
    assert server.status().pid == left_behind.pid, "the running server is reused, not duplicated"
    postmasters = [p for p in _postgres_processes(server.pgdata) if p.ppid() == 1 or p.pid == left_behind.pid]
    assert [p.pid for p in postmasters if p.pid == left_behind.pid] == [left_behind.pid]
    assert server.stop()
    assert _postgres_processes(server.pgdata) == []


def test_stale_pid_file_is_not_mistaken_for_a_server(data_dir):
    server = EmbeddedServer(data_dir)
    server.start()
    server.stop()
    pid_file = server.pgdata / "postmaster.pid"
    # A crash can leave postmaster.pid behind, naming a pid that is now something else (or nothing).
    pid_file.write_text(f"{os.getpid()}\n{server.pgdata}\n0\n5432\n{server.pgdata}\n\n0 0\nready\n")
    assert not server.status().running
    server.start()
    assert server.status().running and server.status().pid != os.getpid()


def test_cli_server_commands(data_dir):
    runner = CliRunner()
    env = {"RTV_DB_DATA_DIR": str(data_dir)}
    result = runner.invoke(cli, ["server", "status"], env=env)
    assert result.exit_code == 3 and "stopped" in result.output
    result = runner.invoke(cli, ["server", "start"], env=env)
    assert result.exit_code == 0 and "started" in result.output
    result = runner.invoke(cli, ["server", "start"], env=env)
    assert result.exit_code == 0 and "reused" in result.output
    result = runner.invoke(cli, ["server", "url", "--role", "runtime"], env=env)
    assert result.exit_code == 0 and result.output.startswith("postgresql+psycopg://rtv_app")
    result = runner.invoke(cli, ["server", "stop"], env=env)
    assert result.exit_code == 0 and "stopped" in result.output
    result = runner.invoke(cli, ["server", "url"], env=env)
    assert result.exit_code == 1 and "not running" in result.output
