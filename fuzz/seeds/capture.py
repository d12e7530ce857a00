#!/usr/bin/env python3
"""Listens on 127.0.0.1:PORT and writes the first bytes of each connection to OUT_PREFIX-N.

The first bytes a client sends are its ClientHello (TLS) or request head (plain HTTP). We
answer nothing, read until the client has been quiet for a moment, then close; a TLS client
gives up, which is fine: its first flight is what the seeds need.

usage: capture.py PORT OUT_PREFIX COUNT
"""
import os
import socket
import sys


def main():
    port, prefix, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    # Tell capture.sh the listener is up (the file named by $READY).
    if os.environ.get("READY"):
        open(os.environ["READY"], "w").close()
    listener.settimeout(20)
    for n in range(count):
        conn, _ = listener.accept()
        conn.settimeout(1.0)
        data = b""
        try:
            while len(data) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                # A complete HTTP head needs nothing more.
                if data.endswith(b"\r\n\r\n") and not data.startswith(b"\x16"):
                    break
        except socket.timeout:
            pass
        conn.close()
        with open(f"{prefix}-{n}", "wb") as out:
            out.write(data)
        print(f"{prefix}-{n}: {len(data)} bytes", flush=True)


if __name__ == "__main__":
    main()
