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
