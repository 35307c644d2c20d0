"""Install Debian's ``chromium`` for the browser tests (as tests/slurm_setup.py installs Slurm).

``apt-get`` runs only when no Chromium is found and the test process is root;
otherwise the reason is returned and the browser tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find() -> str | None:
    """The Chromium executable on PATH (or /usr/bin/chromium), or None."""
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def ensure(timeout: float = 900) -> tuple[str | None, str]:
    """Return (chromium path, "") or (None, why it is not available)."""
    path = find()
    if path:
        return path, ""
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return None, "chromium is not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = ""
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "fonts-dejavu-core"]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"{' '.join(cmd)} timed out after {timeout} s"
        log += res.stdout + res.stderr
        if res.returncode != 0:
            return None, f"{' '.join(cmd)} failed (exit {res.returncode}):\n{log[-2000:]}"
    path = find()
    return (path, "") if path else (None, "apt-get install chromium succeeded but no chromium executable was found")


if __name__ == "__main__":
    print(ensure())
