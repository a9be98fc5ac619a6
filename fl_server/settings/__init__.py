"""Settings profiles: `embedded` (default, no services) and `production` (environment)."""
