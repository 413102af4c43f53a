"""Open an authorization URL in the user's browser, never through a shell (CVE-2025-6514 class, SEC-12).

Honours `$BROWSER` the way Python's `webbrowser` does: a `os.pathsep`-separated list of commands, each split
like a shell word list but run directly; `%s` in a command is replaced by the URL, otherwise the URL is the last
argument. Without `$BROWSER`, `webbrowser` picks the platform's opener (it runs no shell either). Only https
URLs, or http to a loopback address, all plain printable ASCII, are ever opened; the caller prints the URL in every
case.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import webbrowser

from mcpx.auth.oauth.metadata import DiscoveryError, check_url


def safe_to_open(url: str) -> bool:
    """The daemon's rule for endpoint URLs (https or loopback http, plain printable ASCII), checked again on this
    side before anything is spawned."""
    try:
        check_url(url, "the authorization URL")
    except DiscoveryError:
        return False
    return True


def open_url(url: str) -> bool:
    """Try to open `url`; True if an opener was started."""
    if not safe_to_open(url):
        return False
    browsers = os.environ.get("BROWSER")
    if browsers:
        for command in browsers.split(os.pathsep):
            try:
                words = shlex.split(command)
            except ValueError:
                continue
            if not words:
                continue
            argv = [word.replace("%s", url) for word in words] if "%s" in command else [*words, url]
            try:
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
            except OSError:
                continue
            return True
        return False
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False
