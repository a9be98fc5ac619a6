"""Database sessions (`SESSION_ENGINE`) that ignore session keys Django never issues."""

from django.contrib.sessions.backends.base import VALID_KEY_CHARS
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore

_KEY_CHARS = frozenset(VALID_KEY_CHARS)


class SessionStore(DatabaseSessionStore):
    """A `sessionid` cookie with other characters than Django's key alphabet is no session (never looked up).

    Cookies can carry any character (`"\\000"` unquotes to NUL), and PostgreSQL refuses NUL in a query: without
    this check such a cookie turns every request, anonymous ones included, into a server error.
    """

    def _validate_session_key(self, key: str | None) -> bool:
        return bool(super()._validate_session_key(key)) and set(key or "") <= _KEY_CHARS
