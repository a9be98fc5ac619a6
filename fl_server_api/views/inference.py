"""Inference with uncertainty."""

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fl_server_ai import inference, tasks
from fl_server_api.views.common import MAX_INT64, fields_of, get_int, get_text, read_upload
from fl_server_api.views.models import readable_model
from fl_server_core.exceptions import InvalidInputError

INFERENCE_REQUEST = inline_serializer(
    "InferenceRequest",
    {
        "model_id": serializers.UUIDField(),
        "model_input": serializers.JSONField(help_text="Rows of numbers (JSON), or a tensor file (multipart)."),
        "return_format": serializers.ChoiceField(choices=["json"], required=False),
        "seed": serializers.IntegerField(required=False, help_text="Makes sampling methods reproducible."),
    },
)
INFERENCE_RESPONSE = inline_serializer(
    "InferenceResponse",
    {
        "inference": serializers.JSONField(help_text="Per input row: the (mean) prediction."),
        "uncertainty": serializers.JSONField(
            help_text="variance, std; for probabilities predictive_entropy, expected_entropy, mutual_info."
        ),
        "method": serializers.CharField(),
        "samples": serializers.IntegerField(),
    },
)


class InferenceView(APIView):
    """Predictions of a model with the uncertainty of its training's method."""

    @extend_schema(
        request={"application/json": INFERENCE_REQUEST, "multipart/form-data": INFERENCE_REQUEST},
        responses=INFERENCE_RESPONSE,
    )
    def post(self, request: Request) -> Response:
        """Run the model on `model_input` (JSON rows or a tensor file); never unpickles the input."""
        data = fields_of(request)
        model = readable_model(request, get_text(data, "model_id", max_length=64))
        if data.get("return_format", "json") != "json":
            raise InvalidInputError("return_format: only 'json' is supported.")
        if "model_input" in request.FILES:
            x = inference.parse_tensor_file(read_upload(request, "model_input"))
        else:
            x = inference.parse_json_input(data.get("model_input"))
        seed = (
            get_int(data, "seed", minimum=-MAX_INT64 - 1, maximum=MAX_INT64)
            if data.get("seed") not in (None, "")
            else None
        )
        on_worker = not settings.CELERY_TASK_ALWAYS_EAGER and settings.CELERY_RESULT_BACKEND
        if on_worker and x.numel() > settings.FL_INFERENCE_WORKER_THRESHOLD:
            pending = tasks.run_inference.delay(str(model.id), inference.encode_tensor(x), seed)
            return Response(pending.get(timeout=settings.FL_INFERENCE_TIMEOUT_SECONDS))
        return Response(inference.predict(model, x, seed))
