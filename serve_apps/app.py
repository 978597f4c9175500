"""Ray Serve entry point: `serve run serve_apps.app:app model=NAME@production storage_root=...`.

The logic lives in `dcml.serving`; this module only names the builder for Serve's CLI and config.
"""

from dcml.serving import app_builder

app = app_builder
