"""Container health check: exit 0 when the server's GET /health answers 200, 1 otherwise.

Used by the image's HEALTHCHECK and docker/compose.yaml. Standard library only (runs before and
without the project's imports). The port comes from OVIS2_PORT, as the server's does.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 8000
TIMEOUT_S = 5.0


def health_url(environ: dict[str, str]) -> str:
    port = environ.get("OVIS2_PORT") or DEFAULT_PORT
    return f"http://127.0.0.1:{port}/health"


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    return 0 if is_healthy(health_url(dict(os.environ))) else 1


if __name__ == "__main__":
    sys.exit(main())
