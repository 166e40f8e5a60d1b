"""Settings read from the environment: host lists in both forms, malformed entries refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from category_suggester.__main__ import settings_error_text
from category_suggester.settings import Settings


@pytest.mark.parametrize(
    "raw",
    [
        "127.0.0.1:8090, Images.Example.com",
        '["127.0.0.1:8090", "Images.Example.com"]',
        ' [ "127.0.0.1:8090" ,"images.example.com" ] ',
    ],
)
def test_allowed_hosts_accept_a_comma_list_and_a_json_list(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("SUGGESTER_FETCH__ALLOWED_HOSTS", raw)
    assert Settings().fetch.allowed_hosts == ("127.0.0.1:8090", "images.example.com")


def test_ipv6_entries_keep_their_brackets_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUGGESTER_FETCH__ALLOWED_HOSTS", "[::1]:8090,[fd00::5]")
    assert Settings().fetch.allowed_hosts == ("[::1]:8090", "[fd00::5]")


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("SUGGESTER_FETCH__ALLOWED_HOSTS", '["127.0.0.1:8090"'),  # JSON cut short
        ("SUGGESTER_FETCH__ALLOWED_HOSTS", '[8090, "a.example"]'),  # not strings
        ("SUGGESTER_FETCH__ALLOWED_HOSTS", "http://127.0.0.1:8090"),  # a URL, not a host
        ("SUGGESTER_FETCH__ALLOWED_HOSTS", "127.0.0.1:99999"),  # no such port
        ("SUGGESTER_FETCH__ALLOWED_HOSTS", "images example.com"),
        ("SUGGESTER_FETCH__HOST_ALLOWLIST", "images.example.com:443"),  # names only
    ],
)
def test_a_malformed_host_entry_stops_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert variable in settings_error_text(caught.value)
