"""stub"""

from __future__ import annotations

from exo_master.http.api import Api
from exo_master.http.routes import ApiRoute


def routes(api: Api) -> list[ApiRoute]:
    return []
