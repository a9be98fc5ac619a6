"""Root URLs: the admin and the API."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("fl_server_api.urls")),
]

handler404 = "fl_server_api.errors.json_not_found"
handler500 = "fl_server_api.errors.json_server_error"
