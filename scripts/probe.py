#!/usr/bin/env python3
"""Readiness probes of the local stack: `probe.py mongo|s3|smtp HOST PORT`.

Exit 0 when the service answers a real request (MongoDB: a `ping` command
over OP_MSG; S3: an HTTP answer from the bucket URL; SMTP: a 220 greeting and
a NOOP), non-zero otherwise. Standard library only: it runs before anything
else is installed.
"""
import socket
import struct
import sys
import urllib.error
import urllib.request


def bson_doc(pairs):
    body = b""
    for key, value in pairs:
        k = key.encode() + b"\x00"
        if isinstance(value, int):
            body += b"\x10" + k + struct.pack("<i", value)
        else:
            v = value.encode() + b"\x00"
            body += b"\x02" + k + struct.pack("<i", len(v)) + v
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def mongo(host, port):
    doc = bson_doc([("ping", 1), ("$db", "admin")])
    msg = struct.pack("<I", 0) + b"\x00" + doc  # flags, section kind 0
    header = struct.pack("<iiii", 16 + len(msg), 1, 0, 2013)  # OP_MSG
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(header + msg)
        data = b""
        while len(data) < 16 or len(data) < struct.unpack("<i", data[:4])[0]:
            chunk = s.recv(65536)
            if not chunk:
                return False
            data += chunk
    # Reply document contains ok: 1.0 (double) when the server is healthy.
    return b"\x01ok\x00" + struct.pack("<d", 1.0) in data


def s3(host, port):
    try:
        urllib.request.urlopen(f"http://{host}:{port}/imports/", timeout=3)
        return True
    except urllib.error.HTTPError as e:
        return e.code in (200, 403)  # unsigned request: Garage says 403
    except OSError:
        return False


def smtp(host, port):
    with socket.create_connection((host, port), timeout=3) as s:
        f = s.makefile("rwb")
        if not f.readline().startswith(b"220"):
            return False
        f.write(b"NOOP\r\n")
        f.flush()
        ok = f.readline().startswith(b"250")
        f.write(b"QUIT\r\n")
        f.flush()
        return ok


if __name__ == "__main__":
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        ok = {"mongo": mongo, "s3": s3, "smtp": smtp}[kind](host, port)
    except OSError:
        ok = False
    sys.exit(0 if ok else 1)
