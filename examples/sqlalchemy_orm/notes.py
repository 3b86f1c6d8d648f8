"""A sync ORM script on poolguard's shared pool.

    DATABASE_URL=postgresql://app:secret@localhost/app python examples/sqlalchemy_orm/notes.py

The engine keeps no pool of its own: its connections come from poolguard's pool (max_size 4 by
default, POOLGUARD_MAX_SIZE to change it), which raw psycopg code in the same process shares.
"""

from __future__ import annotations

from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import poolguard
from poolguard.sqlalchemy import create_engine


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "orm_notes"  # not Alembic's example_notes: the examples stay independent

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def main() -> None:
    poolguard.configure()  # DATABASE_URL (or POOLGUARD_DSN)
    engine = create_engine()  # the configured pool, psycopg driver
    Base.metadata.create_all(engine)

    with Session(engine) as session, session.begin():  # commits, or rolls back on error
        session.add_all(Note(text=f"note {i}") for i in range(3))

    with Session(engine) as session:
        count = session.scalar(select(func.count()).select_from(Note))
        print(f"{count} notes")

    with poolguard.connection() as conn:  # raw psycopg, same pool, same budget
        row = conn.execute("SELECT count(*) FROM orm_notes").fetchone()
        print(f"psycopg sees {row[0] if row else 0} notes")
    print(f"connections checked out now: {len(poolguard.get_pool().checkouts())}")
    poolguard.reset()  # close the pool at exit


if __name__ == "__main__":
    main()
