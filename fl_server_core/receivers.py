"""Signal receivers of the data layer: API tokens and model store clean-up."""

from typing import Any

from django.db import transaction
from django.db.models import ProtectedError
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from rest_framework.authtoken.models import Token

from fl_server_core.models import Blob, Model, SWAGUpdate, TrainingRound, User, WeightsVersion
from fl_server_core.storage import get_model_storage


@receiver(post_save, sender=User)
def create_token_for_new_user(sender: type[User], instance: User, created: bool, **kwargs: Any) -> None:
    """Every user gets an API token when it is created."""
    if created:
        Token.objects.get_or_create(user=instance)


def release_blobs(ids: list[int]) -> None:
    """Delete the blobs that nothing references any more (current weights are also the latest version)."""
    for blob in Blob.objects.filter(id__in=ids):
        try:
            with transaction.atomic():
                blob.delete()
        except ProtectedError:
            pass  # still referenced by another row


@receiver(post_delete, sender=Model)
@receiver(post_delete, sender=SWAGUpdate)
@receiver(post_delete, sender=TrainingRound)
@receiver(post_delete, sender=WeightsVersion)
def delete_owned_blobs(
    sender: type, instance: Model | SWAGUpdate | TrainingRound | WeightsVersion, **kwargs: Any
) -> None:
    """A deleted row takes the store objects it owns with it."""
    release_blobs(instance.blob_ids())


@receiver(post_delete, sender=Blob)
def delete_stored_object(sender: type[Blob], instance: Blob, **kwargs: Any) -> None:
    """Remove the bytes once the deletion is committed (a rollback keeps them)."""
    key = instance.key
    transaction.on_commit(lambda: get_model_storage().delete(key))
