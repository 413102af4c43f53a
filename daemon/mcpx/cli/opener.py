"""Open an authorization URL in the user's browser, never through a shell (CVE-2025-6514 class, SEC-12).

Honours `$BROWSER` the way Python's `webbrowser` does: a `os.pathsep`-separated list of commands, each split
like a shell word list but run directly; `%s` in a command is replaced by the URL, otherwise the URL is the last
argument. Without `$BROWSER`, `webbrowser` picks the platform's opener (it runs no shell either). Only https
URLs, or http to a loopback address, are ever opened; the caller prints the URL in every case.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import subprocess
import webbrowser
from urllib.parse import urlsplit


def safe_to_open(url: str) -> bool:
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url) or url.startswith("-"):
        return False
    parts = urlsplit(url)
    if parts.scheme == "https":
        return bool(parts.hostname)
    if parts.scheme != "http" or parts.hostname is None:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


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
