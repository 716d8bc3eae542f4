"""Bundles through OCI registries, as CNCF ModelPack artifacts with a signed referrer.

``mapping`` (pure JSON construction and parsing), ``registry`` (distribution-spec client over
httpx: token and basic auth, TLS, ranges), ``layout`` (OCI image-layout directories),
``targets`` (the one interface both give push and pull), ``push`` / ``pull`` (library entry
points) and ``source`` (the ingest session's chunk source over layer blobs). docs/OCI.md
holds the mapping and the site recipes.
"""
