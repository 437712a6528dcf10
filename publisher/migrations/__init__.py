"""The publisher's Alembic migrations; ``publisher.migrate`` runs them.

To add a revision, change ``publisher/schema.py``, bring a scratch SQLite database to head
and let Alembic draft the difference, then read and edit the draft::

    from alembic import command
    from publisher import migrate

    config = migrate.alembic_config("sqlite:///scratch.db")
    command.upgrade(config, "head")
    command.revision(config, message="add widgets", autogenerate=True, rev_id="0002")

Run ``ruff format`` and ``ruff check --fix`` on the draft. Revision ids are four-digit
sequence numbers; the history stays linear. An index on a table that already exists is
created and dropped through ``publisher.migrations.indexes``, so that on PostgreSQL the
migration does not stop the writes of publishers still running.
"""
