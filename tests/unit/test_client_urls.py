"""The SDKs' HTTP client takes one URL or several instances' URLs, nothing else."""

from __future__ import annotations

import pytest

from reliable_msg.sdk.client import ServiceClient


@pytest.mark.parametrize("urls", [[], [""], "", ["http://a:8470", ""]])
def test_the_client_refuses_no_url(urls: str | list[str]) -> None:
    with pytest.raises(ValueError, match="a URL or a list of URLs"):
        ServiceClient(urls, "token")


def test_the_client_takes_one_url_or_several() -> None:
    ServiceClient("http://a:8470/", "token")
    ServiceClient(("http://a:8470", "http://b:8470"), "token")
