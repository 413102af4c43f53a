"""A scripted browser for `mcpxctl login` tests, run through `$BROWSER` as a real browser would be.

It GETs the authorization URL, and follows the redirects (only to loopback) until it reaches the page the flow
ends on, like a user who approves at once. Standard library only. Writes what it did to `$MCPX_TEST_BROWSER_LOG`.
"""

from __future__ import annotations

import os
import shlex
import sys
import urllib.error
import urllib.request
from urllib.parse import urljoin

# What tests put in `$BROWSER` (mcpx's opener splits it like a shell word list and runs it without a shell).
COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def main() -> int:
    url = sys.argv[-1]
    opener = urllib.request.build_opener(_NoRedirect)
    log = os.environ.get("MCPX_TEST_BROWSER_LOG")
    for _ in range(5):
        if log:
            with open(log, "a", encoding="utf-8") as file:
                file.write(url.split("?", 1)[0] + "\n")
        try:
            with opener.open(url, timeout=10) as response:
                response.read()
                return 0
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location")
            if exc.code not in (301, 302, 303, 307, 308) or not location:
                return 1
            url = urljoin(url, location)
    return 1


if __name__ == "__main__":
    sys.exit(main())
