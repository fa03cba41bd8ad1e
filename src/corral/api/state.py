"""What every route needs: the settings and the store, hung on the app at creation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.orm import Session

from corral.config import Settings
from corral.layout import HostLayout
from corral.store.db import Store


@dataclass
class AppState:
    settings: Settings
    store: Store

    @property
    def layout(self) -> HostLayout:
        return HostLayout(self.settings.home)


def app_state(request: Request) -> AppState:
    return request.app.state.corral


def db_session(request: Request) -> Iterator[Session]:
    with app_state(request).store.reading() as session:
        yield session
