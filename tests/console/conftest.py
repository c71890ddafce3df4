"""The console's tests reuse the service tests' tiny model (a session fixture)."""

from tests.service.conftest import tiny_model_dir  # noqa: F401  (a fixture, imported to share it)
