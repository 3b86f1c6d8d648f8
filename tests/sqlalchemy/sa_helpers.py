"""Helpers for the SQLAlchemy adapter tests: a small ORM model and URL spelling."""

from __future__ import annotations

import sys

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import String
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def sa_url(dsn: str, driver: str = "psycopg") -> URL:
    """A SQLAlchemy URL for a libpq conninfo string (as the fixtures give them)."""
    p = conninfo_to_dict(dsn)
    return URL.create(
        f"postgresql+{driver}",
        username=str(p["user"]),
        password=str(p["password"]),
        host=str(p["host"]),
        port=int(p["port"]),
        database=str(p["dbname"]),
    )


def line_of_caller() -> int:
    """The line number of the caller's next line: where a test takes a connection."""
    return sys._getframe(1).f_lineno + 1
