"""A lying site member for the multi-host tests: a real peer server over a real store whose
chunk answers have one byte flipped (``ChunkTamper`` "flip"). Prints its URL, then serves
until SIGTERM. Run: python tests/lying_peer.py STORE HOST PORT [TLS_DIR]"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_helpers import ChunkTamper

from appliance.peer.server import PeerServer, StoreSource, create_app


def main() -> None:
    store, host, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    tls_dir = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    source = StoreSource(store)
    app = ChunkTamper(create_app(source, host_name="liar"), "flip")
    server = PeerServer(app, host=host, port=port, tls_dir=tls_dir, insecure=tls_dir is None,
                        on_stop=source.close)
    print(f"lying on {server.url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.serve_forever()


if __name__ == "__main__":
    main()
