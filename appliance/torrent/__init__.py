"""BitTorrent v2 (BEP 52) through libtorrent: one more chunk source for the ingest session.

BitTorrent moves bytes; the signed manifest decides trust. A model's torrent (``make``)
carries the manifest, its signatures and the trust chain inside the info dict, its file list
is the model's files exactly, and a fetch (``source``) authenticates what it carries against
this host's trust root before one byte of a file is asked for, then hands every chunk to the
ingest session's sink, which checks it against the signed manifest. ``seed`` seeds published
models read-only; ``session`` holds the libtorrent settings (static peers, LSD, DHT off by
default, SSL torrents with the site CA); ``certs`` the site certificate libtorrent accepts.
See docs/TORRENT.md.
"""
