"""poolguard: one guarded PostgreSQL connection pool per process."""
