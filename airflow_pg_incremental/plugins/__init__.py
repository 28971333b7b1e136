"""The Airflow plugin of airflow-pg-incremental, registered through the `airflow.plugins` entry
point (installing the package is enough):

- a FastAPI app served by Airflow's API server under /pgincr: the Backups view (/pgincr/) and the
  README as HTML (/pgincr/docs, the provider's documentation link);
- a "Backups" entry in the UI's navigation that shows the view inside the Airflow UI.

Every Airflow process loads plugins (workers too): this module imports nothing heavy; the app is
built on first use, by the API server only.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/pgincr"


class PgIncrementalPlugin(AirflowPlugin):
    name = "pgincr"
    # relative hrefs resolve against the UI's base URL ([api] base_url), so a sub-path deployment works
    external_views = [{
        "name": "Backups",
        "href": "pgincr/",
        "url_route": "backups",
        "destination": "nav",
        "icon": "pgincr/icon.svg",
        "icon_dark_mode": "pgincr/icon.svg?dark=true",
    }]

    @property
    def fastapi_apps(self) -> list[dict]:  # type: ignore[override]
        from .app import create_app

        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "pgincr Backups view"}]
