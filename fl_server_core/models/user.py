"""Users: actors create trainings, clients take part in them."""

import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person or a client machine; `actor` and `client` describe its role."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    actor = models.BooleanField(default=False, help_text="May create and manage trainings.")
    client = models.BooleanField(default=False, help_text="Takes part in trainings as a participant.")
    message_endpoint = models.URLField(
        blank=True, default="", help_text="URL that receives the server's notifications (empty: pull mode)."
    )

    class Meta:
        ordering = ["username"]

    def __str__(self) -> str:
        return self.username
