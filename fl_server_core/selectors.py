"""Read queries that decide what a user may see."""

from django.db.models import Q, QuerySet

from fl_server_core.models import AggregationMethod, Model, Training, User


def visible_users(user: User) -> QuerySet[User]:
    """Staff see everyone; others see themselves and the people they train with."""
    if user.is_staff:
        return User.objects.all()
    trainings = trainings_of(user)
    return User.objects.filter(
        Q(pk=user.pk) | Q(actor_trainings__in=trainings) | Q(participant_trainings__in=trainings)
    ).distinct()


def trainings_of(user: User) -> QuerySet[Training]:
    """Trainings the user runs (actor) or takes part in (participant)."""
    return Training.objects.filter(Q(actor=user) | Q(participants=user)).distinct()


def visible_models(user: User) -> QuerySet[Model]:
    """Models the user owns, its trainings' global models, and updates of trainings it runs (FedDC: joins)."""
    if user.is_staff:
        return Model.objects.all()
    return Model.objects.filter(
        Q(owner=user)
        | Q(training__actor=user)
        | Q(training__participants=user)
        | Q(base_model__training__actor=user)
        # FedDC hands each client another client's local model to continue from
        | Q(base_model__training__participants=user, base_model__training__aggregation_method=AggregationMethod.FED_DC)
    ).distinct()


def can_read_model(user: User, model: Model) -> bool:
    """Whether the user may download the model and read its metadata and metrics."""
    return visible_models(user).filter(pk=model.pk).exists()


def can_manage_model(user: User, model: Model) -> bool:
    """Whether the user may change or delete the model (owner, its training's actor, staff)."""
    training = getattr(model, "training", None)
    return user.is_staff or model.owner_id == user.pk or (training is not None and training.actor_id == user.pk)


def training_of_model(model: Model) -> Training | None:
    """The training a global model belongs to, if any."""
    return Training.objects.filter(model=model).first()


def is_participant(user: User, training: Training) -> bool:
    """Whether the user takes part in the training."""
    return training.participants.filter(pk=user.pk).exists()
