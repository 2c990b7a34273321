"""The CLI's database commands, on a database of the test's own."""

from __future__ import annotations

from click.testing import CliRunner

from rtv_db.cli import cli


def test_migrate_creates_everything_then_changes_nothing(empty_target):
    runner = CliRunner()
    url = empty_target.require_admin()
    first = runner.invoke(cli, ["migrate", "--database-url", url])
    assert first.exit_code == 0, first.output
    assert "migrated" in first.output and "empty" in first.output
    second = runner.invoke(cli, ["migrate", "--database-url", url])
    assert second.exit_code == 0 and "nothing to do" in second.output


def test_migrate_reports_a_bad_url_cleanly(empty_target):
    url = empty_target.require_admin().replace("/rtv_test_", "/missing_")
    result = CliRunner().invoke(cli, ["migrate", "--database-url", url])
    assert result.exit_code == 1
    assert "DatabaseConnectionError" in result.output and "missing_" in result.output
    assert "Traceback" not in result.output


def test_downgrade_needs_confirmation(target):
    result = CliRunner().invoke(cli, ["downgrade", "--database-url", target.require_admin()], input="n\n")
    assert result.exit_code != 0
    result = CliRunner().invoke(cli, ["downgrade", "--database-url", target.require_admin(), "--yes"])
    assert result.exit_code == 0, result.output
    assert "-> base" in result.output


def test_migrate_says_when_it_switches_the_context_mode(target, monkeypatch):
    """Issue 11: a mode switch is a change, not "nothing to do"."""
    runner = CliRunner()
    url = target.require_admin()
    monkeypatch.setenv("RTV_DB_CONTEXT_MODE", "unsigned")
    switched = runner.invoke(cli, ["migrate", "--database-url", url])
    assert switched.exit_code == 0, switched.output
    assert "nothing to do" not in switched.output
    assert "context mode: signed -> unsigned" in switched.output and "RTV_DB_CONTEXT_MODE" in switched.output
    monkeypatch.delenv("RTV_DB_CONTEXT_MODE")
    back = runner.invoke(cli, ["migrate", "--database-url", url])
    assert "context mode: unsigned -> signed" in back.output
    assert "nothing to do" in runner.invoke(cli, ["migrate", "--database-url", url]).output
