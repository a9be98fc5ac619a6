"""URLs of the REST API (mounted under /api/)."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from fl_server_api.views import inference, models, trainings, users

router = SimpleRouter(trailing_slash=True)
router.register("groups", users.GroupViewSet, basename="group")

urlpatterns = [
    path("users/", users.UserListView.as_view(), name="users"),
    path("users/myself/", users.MyselfView.as_view(), name="user-myself"),
    path("users/groups/", users.MyGroupsView.as_view(), name="user-groups"),
    path("users/trainings/", users.MyTrainingsView.as_view(), name="user-trainings"),
    path("users/<uuid:pk>/", users.UserDetailView.as_view(), name="user-detail"),
    path("models/", models.ModelListView.as_view(), name="models"),
    path("models/<uuid:pk>/", models.ModelDetailView.as_view(), name="model-detail"),
    path("models/<uuid:pk>/metadata/", models.ModelMetadataView.as_view(), name="model-metadata"),
    path("models/<uuid:pk>/metrics/", models.ModelMetricsView.as_view(), name="model-metrics"),
    path("models/<uuid:pk>/preprocessing/", models.ModelPreprocessingView.as_view(), name="model-preprocessing"),
    path("models/<uuid:pk>/swag/", models.ModelSwagView.as_view(), name="model-swag"),
    path("trainings/", trainings.TrainingListView.as_view(), name="trainings"),
    path("trainings/<uuid:pk>/", trainings.TrainingDetailView.as_view(), name="training-detail"),
    path("trainings/<uuid:pk>/clients/", trainings.TrainingClientsView.as_view(), name="training-clients"),
    path("trainings/<uuid:pk>/start/", trainings.TrainingStartView.as_view(), name="training-start"),
    path("trainings/<uuid:pk>/models/", trainings.TrainingModelsView.as_view(), name="training-models"),
    path(
        "trainings/<uuid:pk>/models/latest/",
        trainings.TrainingLatestModelsView.as_view(),
        name="training-models-latest",
    ),
    path("trainings/<uuid:pk>/abort/", trainings.TrainingAbortView.as_view(), name="training-abort"),
    path("trainings/<uuid:pk>/events/", trainings.TrainingEventsView.as_view(), name="training-events"),
    path("trainings/<uuid:pk>/rounds/", trainings.TrainingRoundsView.as_view(), name="training-rounds"),
    path("trainings/<uuid:pk>/metrics/", trainings.TrainingMetricsView.as_view(), name="training-metrics"),
    path("inference/", inference.InferenceView.as_view(), name="inference"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("schema/swagger-ui/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    *router.urls,
]
