"""Reaching the Hugging Face hub: decided once per process, before the first hub lookup.

Without a network, transformers and datasets retry every lookup for a minute or more and log
a screenful of retries before failing. One short TCP probe decides instead: when the hub cannot
be reached, this process switches the hub libraries to offline mode, so cached models and
datasets still load at once and anything else fails at once with budgetlora's own message.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_reachable: bool | None = None
PROBE_TIMEOUT_S = 3.0


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _probe() -> bool:
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; a direct probe would say nothing
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config  # read at import time by datasets

        datasets.config.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        pass


def hub_reachable() -> bool:
    """Whether hub lookups can succeed; when not, the hub libraries are switched to offline mode."""
    global _reachable
    if _reachable is None:
        _reachable = not _offline_requested() and _probe()
        if not _reachable:
            _go_offline()
    return _reachable
