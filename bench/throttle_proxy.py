"""A TCP proxy that caps each connection's download rate: S3 as seen from a cloud VM.

On loopback one HTTPS connection to SeaweedFS carries ~1 GB/s, so how many connections a tool
keeps open does not matter there. Against AWS S3 a single connection tops out far lower (AWS's
performance guidance advises byte-range fetches of 8-16 MB in parallel), so it does; the cap is a
chosen model, not a figure measured against AWS. This proxy sits between both tools and
SeaweedFS's HTTPS port and paces every connection's server -> client bytes to --mbps MB/s (a
token bucket, 64 KiB slices); the other direction passes unpaced. TLS passes through untouched (the certificate names 127.0.0.1).

    python bench/throttle_proxy.py --listen 41000 --to 127.0.0.1:40000 --mbps 50

It prints "ready <port>" once listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

SLICE = 64 * 1024


def _pump(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
    """Copy src -> dst until EOF; `rate` bytes/s at most (None: unpaced)."""
    start, sent = time.monotonic(), 0
    try:
        while True:
            data = src.recv(SLICE)
            if not data:
                break
            dst.sendall(data)
            if rate:
                sent += len(data)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
                elif ahead < -0.05:  # idle for a while (between requests): no burst credit
                    start, sent = time.monotonic(), 0
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _serve(client: socket.socket, upstream: tuple[str, int], rate: float) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = threading.Thread(target=_pump, args=(client, server, None), daemon=True)
    up.start()
    _pump(server, client, rate)
    up.join()
    client.close()
    server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--to", required=True, help="host:port to forward to")
    ap.add_argument("--mbps", type=float, required=True, help="download cap per connection, MB/s (10^6 B)")
    a = ap.parse_args(argv)
    host, _, port = a.to.rpartition(":")
    lsock = socket.create_server(("127.0.0.1", a.listen), backlog=128)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"ready {a.listen}", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_serve, args=(conn, (host, int(port)), a.mbps * 1e6), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
