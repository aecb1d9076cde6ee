"""Alembic environment: migrates the connection the Store hands over, or the URL in alembic.ini.

The Store runs ``upgrade head`` itself when it opens a database; the ``alembic`` command line
(``alembic -c daemon/alembic.ini -x url=... upgrade head``) is there for administrators.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from daemon.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
