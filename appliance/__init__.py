"""appliance: air-gapped model provisioning.

Signed GGUF bundles on removable media, verified import into a local store, LAN peers that
pull from each other with per-chunk verification, and llama.cpp serving behind an
OpenAI-compatible API.
"""

from __future__ import annotations

__version__ = "0.1.0"
