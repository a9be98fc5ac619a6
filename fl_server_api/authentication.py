"""HTTP Basic authentication that also accepts `<token>:` (token as user name, empty password)."""

from typing import Any

from django.http import HttpRequest
from rest_framework.authentication import BasicAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import AuthenticationFailed

TOKEN_LENGTH = 40


class BasicOrTokenAuthentication(BasicAuthentication):
    """`Authorization: Basic base64(username:password)` or `Basic base64(<token>:)`."""

    def authenticate_credentials(
        self, userid: str, password: str, request: HttpRequest | None = None
    ) -> tuple[Any, Any]:
        """Check a token given as user name with an empty password, else a user name and password."""
        if password == "" and len(userid) == TOKEN_LENGTH:
            token = Token.objects.select_related("user").filter(key=userid).first()
            if token is None or not token.user.is_active:
                raise AuthenticationFailed("Invalid token.")
            return token.user, token
        return super().authenticate_credentials(userid, password, request)
