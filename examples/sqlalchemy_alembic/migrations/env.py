"""Alembic's environment: migrations run on a direct connection, never through the pool.

DDL takes strong locks and may run long, and migration tools use session state (SET
lock_timeout, advisory locks) that a transaction-mode pooler would hand to another client.  So
migrations use the pool's ``direct_dsn`` (DIRECT_URL), with a NullPool engine that opens one
connection for the run and closes it: it does not take a slot of poolguard's budget either.
"""

from __future__ import annotations

import sqlalchemy
from alembic import context

import poolguard
from poolguard.sqlalchemy import direct_url

poolguard.configure()  # DATABASE_URL (the app's, maybe a pooler) and DIRECT_URL
url = direct_url()

if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
poolguard.reset()
