"""Settings: which server, which roles, which credentials.

rtv-db talks to PostgreSQL under three roles:

* the **admin** URL (``--database-url`` / ``RTV_DB_ADMIN_URL``): a superuser or CREATEROLE login
  that runs ``rtv-db migrate`` and the other CLI commands. Migrations ``SET ROLE`` to the owner.
* the **owner** role (``rtv_owner``, NOLOGIN): owns every table, function and policy.
* the **runtime** role (``rtv_app``): what the application connects as (``DATABASE_URL``).
  It owns nothing, cannot bypass RLS and holds only DML grants.
* the **system** role (``rtv_system``): the explicit cross-tenant scope for seeding and
  maintenance. It bypasses RLS, so it is never the default and every use is logged.

``rtv-db migrate`` also installs the runtime role's settings in the database
(:meth:`Settings.runtime_role_settings`: the two timeouts, the temporary-file limit, and bind
parameters kept out of the server log). The runtime-role guard (:mod:`rtv_db.connection`) puts
back, at connect, whatever the runtime role itself may put back, and refuses a connection whose
role has any other difference.

Without any URL the embedded server is used, and every URL is derived from it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from ._paths import default_data_dir
from .errors import ConfigurationError

__all__ = [
    "Settings",
    "ROLE_NAME",
    "DEFAULT_STATEMENT_TIMEOUT_MS",
    "DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS",
    "DEFAULT_TEMP_FILE_LIMIT_KB",
    "runtime_role_settings",
    "runtime_role_settings_from_env",
    "OPTIONAL_ROLE_SETTINGS",
    "RoleSettingsDiff",
    "diff_role_settings",
    "redact_url",
    "to_sqlalchemy_url",
    "to_libpq_url",
]

ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
# Environment variable -> Settings field, for the timeouts `migrate` installs as role settings.
_TIMEOUT_ENV = {
    "statement_timeout_ms": "RTV_DB_STATEMENT_TIMEOUT_MS",
    "idle_in_transaction_timeout_ms": "RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
}
# The runtime role's temp_file_limit (kB per process): one statement's sorts and hashes may not fill
# the server's disk. A superuser-only parameter, so the runtime role cannot lift it.
DEFAULT_TEMP_FILE_LIMIT_KB = 1_048_576  # 1 GB
_TEMP_FILE_LIMIT_ENV = "RTV_DB_TEMP_FILE_LIMIT_KB"
_MAX_TEMP_FILE_LIMIT_KB = 2_147_483_647  # PostgreSQL's maximum (INT_MAX kB)


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _env_ms(name: str) -> int | None:
    value = _env(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} is not a whole number of milliseconds") from None


def _check_timeout(attr: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        env = _TIMEOUT_ENV.get(attr, attr)
        raise ConfigurationError(
            f"{attr}={value!r} ({env}) must be a positive number of milliseconds: 0 would let one "
            "tenant's statement or open transaction run for ever"
        )


def _check_temp_file_limit(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_TEMP_FILE_LIMIT_KB:
        raise ConfigurationError(
            f"temp_file_limit_kb={value!r} ({_TEMP_FILE_LIMIT_ENV}) must be a positive number of kilobytes up to "
            f"{_MAX_TEMP_FILE_LIMIT_KB}: without a limit one tenant's statement may fill the server's disk"
        )


def runtime_role_settings(
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    idle_in_transaction_timeout_ms: int = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    temp_file_limit_kb: int = DEFAULT_TEMP_FILE_LIMIT_KB,
) -> dict[str, str]:
    """The runtime role's settings in the database, exactly as ``rtv-db migrate`` installs them.

    Keys and values as PostgreSQL stores them in ``pg_db_role_setting.setconfig``
    (``ALTER ROLE <runtime> IN DATABASE <db> SET key = value``). The timeouts are role settings,
    not startup options, so that they hold behind a pooler. ``log_parameter_max_length`` and
    ``log_parameter_max_length_on_error`` at 0 keep bind parameters (the signed tenant-context
    token is one) out of the server log, whatever statement logging is on. ``temp_file_limit``
    (kB) bounds the temporary files of each of its processes.
    """
    _check_timeout("statement_timeout_ms", statement_timeout_ms)
    _check_timeout("idle_in_transaction_timeout_ms", idle_in_transaction_timeout_ms)
    _check_temp_file_limit(temp_file_limit_kb)
    return {
        "statement_timeout": str(int(statement_timeout_ms)),
        "idle_in_transaction_session_timeout": str(int(idle_in_transaction_timeout_ms)),
        "log_parameter_max_length": "0",
        "log_parameter_max_length_on_error": "0",
        "temp_file_limit": str(int(temp_file_limit_kb)),
    }


# Role settings accepted besides the installed ones, with the only value allowed: `rtv-db migrate`
# sets this one on a Citus coordinator (see citus/apply.py).
OPTIONAL_ROLE_SETTINGS = {"citus.propagate_set_commands": "local"}
_SHOWN_VALUE = 60  # characters of a setting's value quoted in messages (the value is anyone's text)


def _shown(key: str, value: str) -> str:
    return f"{key}={value[:_SHOWN_VALUE]!r}" + ("..." if len(value) > _SHOWN_VALUE else "")


def _parse_setconfig(entries: Iterable[str] | None) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for entry in entries or ():
        key, _, value = str(entry).partition("=")
        parsed[key] = value
    return parsed


@dataclass(frozen=True)
class RoleSettingsDiff:
    """How a role's ``pg_db_role_setting`` rows differ from what ``rtv-db migrate`` installs."""

    for_every_database: dict[str, str]  # the row with setdatabase = 0: migrate installs none
    unexpected: dict[str, str]  # keys of this database's row that rtv-db never installs
    wrong: dict[str, tuple[str, str]]  # installed keys with another value: key -> (value, installed)
    missing: dict[str, str]  # installed keys that are not there: key -> installed value

    def __bool__(self) -> bool:
        return bool(self.for_every_database or self.unexpected or self.wrong or self.missing)

    def describe(self, *, missing: bool = True) -> list[str]:
        """One phrase per difference, for messages."""
        items = [f"{_shown(k, v)} for every database" for k, v in self.for_every_database.items()]
        items += [f"{_shown(k, v)}, which rtv-db never installs" for k, v in self.unexpected.items()]
        items += [f"{_shown(k, v)} (rtv-db installs {want!r})" for k, (v, want) in self.wrong.items()]
        if missing:
            items += [f"{k} missing (rtv-db installs {want!r})" for k, want in self.missing.items()]
        return items


def diff_role_settings(global_setconfig: Iterable[str] | None, database_setconfig: Iterable[str] | None,
                       expected: Mapping[str, str]) -> RoleSettingsDiff:
    """Compare a role's settings (``setconfig`` of its row for every database and of its row for
    this database, each possibly None) with ``expected`` (:func:`runtime_role_settings`)."""
    here = _parse_setconfig(database_setconfig)
    return RoleSettingsDiff(
        for_every_database=_parse_setconfig(global_setconfig),
        unexpected={k: v for k, v in here.items() if k not in expected and OPTIONAL_ROLE_SETTINGS.get(k) != v},
        wrong={k: (v, expected[k]) for k, v in here.items() if k in expected and v != expected[k]},
        missing={k: v for k, v in expected.items() if k not in here},
    )


def _env_kb(name: str) -> int | None:
    value = _env(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} is not a whole number of kilobytes") from None


def runtime_role_settings_from_env() -> dict[str, str]:
    """:func:`runtime_role_settings` with the timeouts of ``RTV_DB_STATEMENT_TIMEOUT_MS`` and
    ``RTV_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS`` (defaults 30 s and 60 s) and the temporary-file limit
    of ``RTV_DB_TEMP_FILE_LIMIT_KB`` (default 1 GB).

    What the runtime-role guard expects at connect: the application and ``rtv-db migrate`` must
    see the same values (like the context key).
    """
    statement = _env_ms(_TIMEOUT_ENV["statement_timeout_ms"])
    idle = _env_ms(_TIMEOUT_ENV["idle_in_transaction_timeout_ms"])
    temp_files = _env_kb(_TEMP_FILE_LIMIT_ENV)
    return runtime_role_settings(
        DEFAULT_STATEMENT_TIMEOUT_MS if statement is None else statement,
        DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS if idle is None else idle,
        DEFAULT_TEMP_FILE_LIMIT_KB if temp_files is None else temp_files,
    )


@dataclass(frozen=True)
class Settings:
    """Where the database is and which roles rtv-db uses. Build with :meth:`from_env`."""

    admin_url: str | None = None
    runtime_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    database: str = "rtv"
    owner_role: str = "rtv_owner"
    runtime_role: str = "rtv_app"
    runtime_password: str | None = None
    system_role: str = "rtv_system"
    system_password: str | None = None
    # Installed by `migrate` as the runtime role's settings in the database (not startup options).
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS
    idle_in_transaction_timeout_ms: int = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT_MS
    temp_file_limit_kb: int = DEFAULT_TEMP_FILE_LIMIT_KB

    def __post_init__(self) -> None:
        for attr in ("owner_role", "runtime_role", "system_role"):
            name = getattr(self, attr)
            if not ROLE_NAME.match(name):
                raise ConfigurationError(
                    f"{attr}={name!r} is not a plain lower-case PostgreSQL role name"
                )
        if len({self.owner_role, self.runtime_role, self.system_role}) != 3:
            raise ConfigurationError("owner, runtime and system roles must be three different roles")
        for attr in _TIMEOUT_ENV:
            _check_timeout(attr, getattr(self, attr))
        _check_temp_file_limit(self.temp_file_limit_kb)

    @classmethod
    def from_env(cls, *, admin_url: str | None = None, **overrides: object) -> "Settings":
        """Settings from ``RTV_DB_*`` environment variables, with explicit values winning."""
        values: dict[str, object] = {
            "admin_url": admin_url or _env("RTV_DB_ADMIN_URL"),
            "runtime_url": _env("DATABASE_URL"),
        }
        data_dir = _env("RTV_DB_DATA_DIR")
        if data_dir:
            values["data_dir"] = Path(data_dir)
        for key in ("owner_role", "runtime_role", "runtime_password", "system_role", "system_password"):
            env_value = _env(f"RTV_DB_{key.upper()}")
            if env_value is not None:
                values[key] = env_value
        for attr, env_name in _TIMEOUT_ENV.items():
            ms = _env_ms(env_name)
            if ms is not None:
                values[attr] = ms
        temp_files = _env_kb(_TEMP_FILE_LIMIT_ENV)
        if temp_files is not None:
            values["temp_file_limit_kb"] = temp_files
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def runtime_role_settings(self) -> dict[str, str]:
        """What ``migrate`` installs for the runtime role in the database (see :func:`runtime_role_settings`)."""
        return runtime_role_settings(self.statement_timeout_ms, self.idle_in_transaction_timeout_ms,
                                     self.temp_file_limit_kb)

    @property
    def uses_embedded_server(self) -> bool:
        """True when no URL is configured and the embedded server is the database."""
        return self.admin_url is None and self.runtime_url is None

    def role_url(self, base_url: str, role: str, password: str | None) -> str:
        """``base_url`` with its user (and password) replaced by ``role``."""
        url = make_url(to_sqlalchemy_url(base_url)).set(username=role, password=password)
        return url.render_as_string(hide_password=False)

    def derived_runtime_url(self, admin_url: str) -> str:
        """The runtime URL: ``DATABASE_URL`` when set, else the admin URL as the runtime role."""
        if self.runtime_url:
            return to_sqlalchemy_url(self.runtime_url)
        return self.role_url(admin_url, self.runtime_role, self.runtime_password)

    def derived_system_url(self, admin_url: str) -> str:
        """The admin URL as the system role."""
        return self.role_url(admin_url, self.system_role, self.system_password)


def to_sqlalchemy_url(url: str | URL) -> str:
    """A SQLAlchemy URL on the psycopg 3 driver, from a libpq or SQLAlchemy URL."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+asyncpg"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise ConfigurationError(f"not a PostgreSQL URL: {redact_url(str(url))}")
    return parsed.render_as_string(hide_password=False)


def to_libpq_url(url: str | URL) -> str:
    """A plain ``postgresql://`` URL for psycopg.connect, from a SQLAlchemy URL."""
    parsed = make_url(to_sqlalchemy_url(url) if isinstance(url, str) else url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def redact_url(url: str | URL) -> str:
    """The URL with its password masked, safe for logs and error messages."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
        return parsed.render_as_string(hide_password=True)
    except Exception:  # an unparsable URL may still hold a password: print none of it
        return "<unparsable database URL>"


def describe_target(url: str | URL) -> str:
    """``database 'x' on host 'y'`` for error messages; never includes credentials."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception:
        return "an unparsable database URL"
    host = parsed.host or parsed.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = f":{parsed.port}" if parsed.port else ""
    return f"database {parsed.database!r} on host {host}{port} as user {parsed.username!r}"
