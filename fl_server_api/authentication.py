"""Token and HTTP Basic authentication (Basic also accepts `<token>:`: token as user name, empty password).

Credentials holding a NUL character are refused before any database lookup: they can match no user or token,
and PostgreSQL refuses NUL in a query, which would turn a wrong password into a server error.
"""

from typing import Any

from django.http import HttpRequest
from rest_framework import authentication
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import AuthenticationFailed

TOKEN_LENGTH = 40


class TokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        """Check the token."""
        if "\x00" in key:
            raise AuthenticationFailed("Invalid token.")
        return super().authenticate_credentials(key)


class BasicOrTokenAuthentication(authentication.BasicAuthentication):
    """`Authorization: Basic base64(username:password)` or `Basic base64(<token>:)`."""

    def authenticate_credentials(
        self, userid: str, password: str, request: HttpRequest | None = None
    ) -> tuple[Any, Any]:
        """Check a token given as user name with an empty password, else a user name and password."""
        if "\x00" in userid:
            raise AuthenticationFailed("Invalid username/password.")
        if password == "" and len(userid) == TOKEN_LENGTH:
            token = Token.objects.select_related("user").filter(key=userid).first()
            if token is None or not token.user.is_active:
                raise AuthenticationFailed("Invalid token.")
            return token.user, token
        return super().authenticate_credentials(userid, password, request)
