"""Service metadata store: ORM models and sessions (SQLite for dev, PostgreSQL in production)."""
