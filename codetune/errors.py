"""User-facing errors: `main` prints their message (which names the flag or file and the fix) and
exits with status 2 instead of showing a traceback."""


class ConfigError(ValueError):
    """A bad flag, config value, path or input repository."""
