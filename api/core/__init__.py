"""Service-wide plumbing: settings."""
