"""The controller's typed view, built again each pass from its copy of the store."""

from __future__ import annotations

from pathlib import Path

from meshctl.commands.read import get_service
from meshctl.commands.service import create_service, remove_service, scale_services
from meshctl.model import Service
from meshctl.store.sqlite import SqliteStore
from meshctl.view import Decoded, view_of


def test_a_record_that_did_not_move_is_not_decoded_again(tmp_path: Path) -> None:
    """A pass decodes only the records that changed since the last one; the others are the
    same (frozen) objects, which leaves the collector nothing new to scan."""
    with SqliteStore(str(tmp_path / "state.db")) as store:
        create_service(store, Service("web", ("true",)))
        create_service(store, Service("api", ("true",)))
        decoded = Decoded()
        first = view_of(store.snapshot(), decoded)
        web, api = (get_service(store, n).id for n in ("web", "api"))
        scale_services(store, {"web": 3})
        store.put("service", "broken", {"name": 1})
        second = view_of(store.snapshot(), decoded)
        assert second.services[api] is first.services[api]
        assert second.services[web] is not first.services[web]
        assert second.services[web].replicas == 3
        assert ("service", "broken") in second.broken  # a bad record is still named each time
        assert view_of(store.snapshot(), decoded).broken == second.broken
        remove_service(store, "api")
        third = view_of(store.snapshot(), decoded)
        assert api not in third.services
        assert ("service", api) not in decoded._objects  # a deleted record's object goes
        assert view_of(store.snapshot()) == third  # the same view as built without a cache
