"""HTTP: thin DRF views over the services, serializers, URLs and the OpenAPI schema."""
