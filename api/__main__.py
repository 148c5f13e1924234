"""`python -m api`: run the gateway with uvicorn on the configured host and port."""

from __future__ import annotations

import uvicorn

from api.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run("api.main:app", host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
