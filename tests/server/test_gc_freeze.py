"""The server freezes what start-up left alive, so no full garbage collection rescans it mid-request."""

from __future__ import annotations

import gc


def test_startup_objects_are_frozen(make_client):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    client = make_client()
    assert client.get("/health").status_code == 200
    assert gc.get_freeze_count() > 1000  # the app, its routes and everything imported
