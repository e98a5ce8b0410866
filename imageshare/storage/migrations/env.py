"""Alembic environment: runs migrations on the connection handed over by ImageShare."""

from alembic import context

from imageshare.storage.index.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
