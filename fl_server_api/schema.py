"""OpenAPI description of the custom authentication scheme."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BasicOrTokenScheme(OpenApiAuthenticationExtension):
    """HTTP Basic with a user name and password, or a token as user name and an empty password."""

    target_class = "fl_server_api.authentication.BasicOrTokenAuthentication"
    name = "basicAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        """The scheme as OpenAPI sees it."""
        return {
            "type": "http",
            "scheme": "basic",
            "description": "username:password, or <40-character token>: with an empty password.",
        }
