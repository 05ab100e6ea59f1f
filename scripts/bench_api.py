#!/usr/bin/env python3
"""What a push through the server API costs the node, beside the same push
sent by a client over WebSocket: N pushes to one user, whose connection reads
them all, and the node's CPU time (from /proc) over the run.

    bench_api.py --pid PID --ws 127.0.0.1:9301 --api 127.0.0.1:9302 --key KEY --pushes 20000

Prints one JSON line per way: pushes, seconds, pushes/s, server CPU µs per push.
Standard library only.
"""
import argparse
import base64
import http.client
import json
import os
import socket
import struct
import threading
import time


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class Ws:
    """A minimal WebSocket client: handshake, masked text frames out, frames in."""

    def __init__(self, addr, query):
        host, port = addr.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.recv()  # the welcome

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def recv(self):
        self._need(2)
        n = self.buf[1] & 0x7F
        at = 2
        if n == 126:
            self._need(4)
            n = struct.unpack(">H", self.buf[2:4])[0]
            at = 4
        self._need(at + n)
        data, self.buf = self.buf[at : at + n], self.buf[at + n :]
        return data

    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        head = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else bytes([0x81, 0xFE]) + struct.pack(">H", len(data))
        self.s.sendall(head + mask + masked)


def drain(ws, n, done):
    for _ in range(n):
        ws.recv()
    done.set()


def run(label, pid, pushes, receiver, send_all):
    done = threading.Event()
    t = threading.Thread(target=drain, args=(receiver, pushes, done), daemon=True)
    t.start()
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    send_all()
    if not done.wait(120):
        raise SystemExit(f"{label}: not every push arrived")
    secs = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    print(json.dumps({
        "way": label,
        "pushes": pushes,
        "seconds": round(secs, 3),
        "pushes_per_s": round(pushes / secs),
        "server_cpu_us_per_push": round(cpu * 1e6 / pushes, 2),
    }), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--ws", required=True)
    p.add_argument("--api", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--pushes", type=int, default=20000)
    a = p.parse_args()
    bob = Ws(a.ws, "uid=bob")
    alice = Ws(a.ws, "uid=alice")
    host, port = a.api.rsplit(":", 1)
    api = http.client.HTTPConnection(host, int(port))
    headers = {"Authorization": f"apikey {a.key}", "Content-Type": "application/json"}
    body = json.dumps({"users": ["bob"], "data": "x" * 32})

    def via_api():
        for _ in range(a.pushes):
            api.request("POST", "/api/push", body, headers)
            r = api.getresponse()
            r.read()
            assert r.status == 200, r.status

    batch = json.dumps({"commands": [{"method": "push", "params": json.loads(body)}] * 100})

    def via_api_batch():
        for _ in range(a.pushes // 100):
            api.request("POST", "/api/batch", batch, headers)
            r = api.getresponse()
            r.read()
            assert r.status == 200, r.status

    def http_floor():
        # The same number of requests that push nothing: what HTTP itself costs.
        cpu0, t0 = cpu_seconds(a.pid), time.monotonic()
        for _ in range(a.pushes):
            api.request("GET", "/ready")
            api.getresponse().read()
        secs = time.monotonic() - t0
        cpu = cpu_seconds(a.pid) - cpu0
        print(json.dumps({
            "way": "http_get_ready",
            "pushes": 0,
            "requests": a.pushes,
            "seconds": round(secs, 3),
            "pushes_per_s": round(a.pushes / secs),
            "server_cpu_us_per_push": round(cpu * 1e6 / a.pushes, 2),
        }), flush=True)

    frame = json.dumps({"op": "to_user", "uid": "bob", "data": "x" * 32})

    def via_client():
        for _ in range(a.pushes):
            alice.send(frame)

    # Warm up both paths, then measure each.
    run("warm-up", a.pid, 1000, bob, lambda: [api.request("POST", "/api/push", body, headers) or api.getresponse().read() for _ in range(1000)])
    run("api", a.pid, a.pushes, bob, via_api)
    run("api_batch100", a.pid, a.pushes // 100 * 100, bob, via_api_batch)
    run("client", a.pid, a.pushes, bob, via_client)
    http_floor()


if __name__ == "__main__":
    main()
