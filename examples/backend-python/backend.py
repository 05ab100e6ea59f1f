#!/usr/bin/env python3
"""A small switchboard backend in plain Python 3 (standard library only).

It does the three things an application server does beside switchboard:

- mints the HS256 tokens its clients connect with (`token`);
- pushes to clients, and asks who is online, through the server API
  (`push`, `online`, `call`);
- runs the events endpoint switchboard posts client events to, and answers a
  client's messages with actions (`serve`).

    python3 backend.py --jwt-secret S token alice --groups lobby
    python3 backend.py --api http://127.0.0.1:8000 --api-key K push --users alice --data hi
    python3 backend.py --events-secret E serve --listen 127.0.0.1:9000

Every option also reads its SWITCHBOARD_* variable (see --help), which keeps
secrets out of the process list. Copy this file and change `ChatApp` to make
it yours.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A batch of events is small; anything far larger is refused unread.
MAX_EVENTS_BODY = 8 * 1024 * 1024


# ---------------------------------------------------------------------------
# Tokens


def _b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def mint_token(secret, sub, groups=(), can=(), session=None, ttl=3600):
    """An HS256 JWT that a node started with --jwt-secret SECRET accepts.

    `sub` is the uid the connection is bound to, `groups` are joined at
    connect (and may be left, rejoined and counted by the client), `can` adds
    permission rules (docs/SECURITY.md), `session` is the connection's initial
    session. `ttl` seconds until it expires; 0 for a token that never does.
    """
    claims = {"sub": sub}
    if groups:
        claims["groups"] = list(groups)
    if can:
        claims["can"] = list(can)
    if session:
        claims["session"] = dict(session)
    if ttl:
        claims["exp"] = int(time.time()) + int(ttl)
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
        for part in (header, claims)
    )
    sig = hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256)
    return signing_input + "." + _b64url(sig.digest())


# ---------------------------------------------------------------------------
# The server API


class ApiError(Exception):
    """The API answered with an error (`code` as in docs/SERVER-API.md), or
    could not be reached (`code` "unreachable", `status` None)."""

    def __init__(self, status, code, message):
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status
        self.code = code
        self.message = message


class Switchboard:
    """A client of switchboard's server API: `POST /api/<method>` with a JSON
    object, `Authorization: apikey KEY`.

    Every method returns the `result` object. Queries (`online`, `user_conns`,
    `group_count`, ...) also set `self.last_complete` and `self.last_missing`:
    an answer some node did not contribute to says so instead of lying.
    """

    def __init__(self, api, key=None, timeout=5.0):
        self.api = api.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.last_complete = True
        self.last_missing = []

    def call(self, method, **params):
        body = json.dumps(params).encode("utf-8")
        req = urllib.request.Request(
            f"{self.api}/api/{method}", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )
        if self.key:
            req.add_header("Authorization", f"apikey {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.load(resp)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                raise ApiError(e.code, err.get("code"), err.get("message")) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(e.code, "http", raw[:200].decode("utf-8", "replace")) from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(None, "unreachable", f"{self.api}: {e}") from None
        self.last_complete = reply.get("complete", True)
        self.last_missing = reply.get("missing", [])
        return reply["result"]

    # Pushes. `data` is text, or bytes (sent as one binary frame).
    def push(self, data, users=(), groups=(), conns=(), all=False,
             except_users=(), except_conns=()):
        params = {"data": data}
        if isinstance(data, (bytes, bytearray)):
            params = {"data": base64.b64encode(data).decode("ascii"), "binary": True}
        for name, value in (("users", users), ("groups", groups), ("conns", conns),
                            ("except_users", except_users), ("except_conns", except_conns)):
            if value:
                params[name] = list(value)
        if all:
            params["all"] = True
        return self.call("push", **params)

    def to_user(self, uid, data):
        return self.push(data, users=[uid])

    def to_group(self, group, data):
        return self.push(data, groups=[group])

    def to_all(self, data):
        return self.push(data, all=True)

    # Membership of any connection, on any node.
    def bind(self, conn, uid):
        return self.call("bind", conn=conn, uid=uid)

    def join(self, conn, group):
        return self.call("join", conn=conn, group=group)

    def leave(self, conn, group):
        return self.call("leave", conn=conn, group=group)

    def close(self, reason=None, **target):
        """Closes what `target` selects (users=[...], groups=[...], conns=[...],
        all=True, except_users=[...], except_conns=[...])."""
        if reason is not None:
            target["reason"] = reason
        return self.call("close", **target)

    # Cluster-wide queries.
    def online(self, uid):
        return self.call("online", uid=uid)["online"]

    def user_conns(self, uid):
        return self.call("user_conns", uid=uid)["conns"]

    def group_count(self, group):
        return self.call("group_count", group=group)["count"]

    def totals(self):
        return self.call("totals")


# ---------------------------------------------------------------------------
# Events


def signature_ok(secret, body, header):
    """Whether `header` (X-Switchboard-Signature) signs `body` with `secret`:
    `sha256=` then the lowercase hex HMAC-SHA256 of the raw body."""
    if not header or not header.startswith("sha256="):
        return False
    want = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, header[len("sha256="):])


class ChatApp:
    """What the backend does with client events: the part to make your own.

    A client's message (any frame switchboard's own protocol does not handle)
    gets a reply with its text upper-cased, and goes to everyone else in the
    room as `{"from": UID, "text": TEXT}`. `/join G` and `/leave G` change the
    sender's groups, `/quit` closes it.
    """

    def __init__(self, room="lobby", log=None):
        self.room = room
        self.log = log or (lambda line: None)

    def handle(self, event):
        """The result for one event: an action object for a `message`,
        None (no action) otherwise."""
        kind = event.get("type")
        if kind == "message":
            return self.on_message(event)
        if kind in ("connect", "close", "online", "offline"):
            self.log(f"{kind} {event.get('uid')} {event.get('conn', '')}".rstrip())
        return None

    def on_message(self, event):
        uid = event.get("uid") or "anonymous"
        if event.get("binary"):
            size = len(base64.b64decode(event.get("data", "")))
            return {"reply": f"{size} bytes received"}
        text = event.get("data", "")
        command, _, arg = text.partition(" ")
        if command == "/join" and arg:
            return {"join": [arg], "reply": f"joined {arg}"}
        if command == "/leave" and arg:
            return {"leave": [arg], "reply": f"left {arg}"}
        if command == "/quit":
            return {"close": "bye"}
        return {
            "reply": text.upper(),
            "push": [{
                "groups": [self.room],
                "except_conns": [event["conn"]],
                "data": json.dumps({"from": uid, "text": text}),
            }],
        }


def events_handler(app, secret, log):
    """The HTTP handler class of the events endpoint (POST /events)."""

    class Events(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            if self.path.split("?")[0] != "/events":
                return self.answer(404, {"error": "not found"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self.answer(411, {"error": "Content-Length required"})
            if length < 0 or length > MAX_EVENTS_BODY:
                self.close_connection = True
                return self.answer(413, {"error": "too large"})
            body = self.rfile.read(length)
            # Verify before parsing: an unsigned body is not even read as JSON.
            if secret and not signature_ok(
                    secret, body, self.headers.get("X-Switchboard-Signature")):
                log("refused a batch with a bad or missing signature")
                return self.answer(401, {"error": "bad signature"})
            try:
                events = json.loads(body)["events"]
                if not isinstance(events, list):
                    raise TypeError("events is not a list")
            except (ValueError, KeyError, TypeError) as e:
                return self.answer(400, {"error": f"bad batch: {e}"})
            results = []
            for event in events:
                try:
                    results.append(app.handle(event) if isinstance(event, dict) else None)
                except Exception as e:  # one bad event must not fail its batch
                    log(f"event {event!r} failed: {e!r}")
                    results.append(None)
            self.answer(200, {"results": results})

        def answer(self, status, obj):
            body = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # requests are not logged one by one
            pass

    return Events


def serve(args):
    def log(line):
        print(line, file=sys.stderr, flush=True)

    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, int(port)),
                    events_handler(ChatApp(args.room, log), args.events_secret, log))
    bound_host, bound_port = server.server_address[:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    # The first line of stdout is the URL to give switchboard's --events-url.
    print(f"http://{bound_host}:{bound_port}/events", flush=True)
    if not args.events_secret:
        log("warning: no --events-secret: any process that reaches this port can post events")

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    server.server_close()
    return 0


# ---------------------------------------------------------------------------
# Command line


def _csv(value):
    return [v for v in value.split(",") if v] if value else []


def _api(args):
    if not args.api:
        raise SystemExit("--api (or SWITCHBOARD_API) is required: the node's API address")
    api = args.api if "://" in args.api else f"http://{args.api}"
    return Switchboard(api, args.api_key)


def cmd_token(args):
    if not args.jwt_secret:
        raise SystemExit("--jwt-secret (or SWITCHBOARD_JWT_SECRET) is required")
    session = dict(kv.split("=", 1) for kv in _csv(args.session))
    print(mint_token(args.jwt_secret, args.uid, _csv(args.groups), _csv(args.can),
                     session, args.ttl))
    return 0


def cmd_push(args):
    data = base64.b64decode(args.data) if args.binary else args.data
    result = _api(args).push(data, users=_csv(args.users), groups=_csv(args.groups),
                             conns=_csv(args.conns), all=args.all,
                             except_users=_csv(args.except_users),
                             except_conns=_csv(args.except_conns))
    print(json.dumps(result))
    return 0


def cmd_online(args):
    sb = _api(args)
    online = sb.online(args.uid)
    print(json.dumps({"uid": args.uid, "online": online,
                      "complete": sb.last_complete, "missing": sb.last_missing}))
    return 0


def cmd_call(args):
    print(json.dumps(_api(args).call(args.method, **json.loads(args.params))))
    return 0


def parser():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api", default=env("SWITCHBOARD_API"),
                   help="the node's API, e.g. http://127.0.0.1:8000 (SWITCHBOARD_API)")
    p.add_argument("--api-key", default=env("SWITCHBOARD_API_KEY"),
                   help="its key (SWITCHBOARD_API_KEY)")
    p.add_argument("--jwt-secret", default=env("SWITCHBOARD_JWT_SECRET"),
                   help="the nodes' HS256 secret, for tokens (SWITCHBOARD_JWT_SECRET)")
    p.add_argument("--events-secret", default=env("SWITCHBOARD_EVENTS_SECRET"),
                   help="the nodes' --events-secret, to verify events (SWITCHBOARD_EVENTS_SECRET)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the events endpoint; prints its URL first")
    s.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (port 0: any free one)")
    s.add_argument("--room", default="lobby", help="the group messages are relayed to")
    s.set_defaults(run=serve)

    t = sub.add_parser("token", help="print a token for a client")
    t.add_argument("uid")
    t.add_argument("--groups", help="comma-separated groups joined at connect")
    t.add_argument("--can", help="comma-separated permission rules")
    t.add_argument("--session", help="comma-separated KEY=VALUE session entries")
    t.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (0: never)")
    t.set_defaults(run=cmd_token)

    u = sub.add_parser("push", help="push data through the API; prints the report")
    u.add_argument("--data", required=True, help="the text (base64 with --binary)")
    u.add_argument("--binary", action="store_true", help="send --data's bytes as a binary frame")
    for name in ("users", "groups", "conns", "except-users", "except-conns"):
        u.add_argument(f"--{name}", help="comma-separated")
    u.add_argument("--all", action="store_true", help="every connection")
    u.set_defaults(run=cmd_push)

    o = sub.add_parser("online", help="whether a user is connected anywhere")
    o.add_argument("uid")
    o.set_defaults(run=cmd_online)

    c = sub.add_parser("call", help="any API method with JSON params")
    c.add_argument("method")
    c.add_argument("params", nargs="?", default="{}")
    c.set_defaults(run=cmd_call)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
