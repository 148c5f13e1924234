"""The HeadCT-Serve client: a small httpx SDK (`headct.client.http`) and the `headct` command line
(`headct.client.cli`). Needs only httpx, no gateway code."""

from headct.client.http import DEFAULT_URL, HeadCTClient, HeadCTProblem, media_type_for, zip_directory

__all__ = ["DEFAULT_URL", "HeadCTClient", "HeadCTProblem", "media_type_for", "zip_directory"]
