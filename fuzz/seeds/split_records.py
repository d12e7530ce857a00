#!/usr/bin/env python3
"""For each ClientHello in DIR sent as one TLS record, writes DIR/NAME-split, the same
handshake message cut into two records (at a third of its length, so the cut falls inside
the extensions or the random), as some clients and middleboxes send it."""
import os
import sys


def main():
    directory = sys.argv[1]
    for name in sorted(os.listdir(directory)):
        if "-split" in name:
            continue
        data = open(os.path.join(directory, name), "rb").read()
        if len(data) < 5 or data[0] != 22:
            continue
        length = int.from_bytes(data[3:5], "big")
        body = data[5 : 5 + length]
        if len(body) < length:
            continue
        cut = max(1, length // 3)
        header = data[0:3]
        out = b""
        for piece in (body[:cut], body[cut:]):
            out += header + len(piece).to_bytes(2, "big") + piece
        out += data[5 + length :]
        with open(os.path.join(directory, name + "-split"), "wb") as f:
            f.write(out)
        print(f"{name}-split: cut at {cut} of {length}")


if __name__ == "__main__":
    main()
