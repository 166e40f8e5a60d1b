"""A command-line tool loads what it uses: no service wiring, no Triton client, no aiohttp.

Each module is imported in a fresh interpreter, which then lists what of the service's
own runtime it loaded.
"""

from __future__ import annotations

import json

import pytest

from tests.support.python import run_python

# The service's wiring, its inference client and its HTTP client (fetch, health, the page).
SERVICE_ONLY = ("category_suggester.service", "category_suggester.app", "tritonclient", "aiohttp")

_LIST_LOADED = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
service_only = sys.argv[2].split(",")
loaded = [name for name in sys.modules if any(
    name == root or name.startswith(root + ".") for root in service_only)]
print(json.dumps(sorted(loaded)))
"""

COMMAND_MODULES = [
    "category_suggester.__main__",
    "category_suggester.ops.ledger",
    "category_suggester.ops.replay_dlq",
    "category_suggester.ops.produce_sample",
    "category_suggester.ops.image_folder",
    # What the commands are built on.
    "category_suggester.client",
    "category_suggester.events",
    "category_suggester.settings",
    "category_suggester.publish",
]


def loaded_service_modules(module: str) -> list[str]:
    done = run_python("-c", _LIST_LOADED, module, ",".join(SERVICE_ONLY), timeout_s=60)
    loaded: list[str] = json.loads(done.stdout)
    return loaded


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_a_command_loads_no_service_internals(module: str) -> None:
    assert loaded_service_modules(module) == []


def test_the_check_sees_what_the_service_loads() -> None:
    wiring = {"category_suggester.service", "category_suggester.app"}
    loaded = loaded_service_modules("category_suggester.service")
    roots = {name if name in wiring else name.split(".")[0] for name in loaded}
    assert roots == set(SERVICE_ONLY)
