"""Alembic environment for rtv-db: runs every revision as the owner role.

``rtv-db migrate`` (:mod:`rtv_db.migrate`) passes an open connection of the admin login in
``config.attributes["connection"]``; the admin ``SET ROLE``s to the owner first, so the owner
owns every object, ``alembic_version`` included.
"""

from __future__ import annotations

from alembic import context

from rtv_db.schema import metadata

config = context.config


def _include_object(obj, name, type_, reflected, compare_to):  # noqa: ANN001
    # alembic_version is Alembic's own, not part of the models.
    return not (type_ == "table" and name == "alembic_version")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `rtv-db migrate` (rtv_db.migrate), not the alembic CLI")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=_include_object,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) mode is not supported; each revision's SQL is in its file")
run_migrations_online()
