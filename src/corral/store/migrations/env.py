"""Alembic environment: runs on the connection the Store hands over, or on sqlalchemy.url for the CLI."""

from alembic import context
from sqlalchemy import create_engine

from corral.store.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if url is None:  # corral.store.db always passes a connection or a URL
            raise RuntimeError("alembic was run without a connection or sqlalchemy.url")
        engine = create_engine(url)
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()


run()
