"""A real HTTP webhook receiver on loopback that verifies every delivery.

For trying inferq's webhooks without a service of your own (and for its tests and benchmarks,
like dramatiq's stub broker): it records each verified delivery and can misbehave on purpose
(``mode``). Verification uses ``WebhookSigner.verify`` unless another ``verifier`` is given,
e.g. a Standard Webhooks library's, as the tests do.

From a terminal, ``python -m webhooks.receiver --secret-file .inferq/webhook_secret`` listens
on http://127.0.0.1:9000/hook and prints one line per request: ``verified`` with the event,
job id and ``webhook-id``, or ``REJECTED`` with the reason (answered 400).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from webhooks.signing import SecretError, WebhookSigner, parse_secrets

MODES = ("ok", "fail", "hang", "garbage", "redirect", "huge", "gone", "slow", "retry_after")


@dataclass
class Received:
    msg_id: str
    event: str
    job_id: str
    at: float  # time.time() on arrival


@dataclass
class Receiver:
    """``mode``: ok | fail | hang | garbage | redirect | huge | gone | slow | retry_after."""

    secret: str
    port: int = 0
    host: str = "127.0.0.1"  # the address it listens on
    tls: ssl.SSLContext | None = None  # serve HTTPS with this server context
    mode: str = "ok"
    hang_s: float = 5.0
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # signature failures
    requests: int = 0
    host_headers: list[str] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)  # TLS SNI of each handshake
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (body, lower-cased headers) -> anything; raises when the delivery is not authentic
    verifier: Callable[[bytes, dict[str, str]], object] | None = None
    # called with one line per request that reached verification (the command line prints it)
    report: Callable[[str], None] | None = None
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.host)

    def url_for(self, host: str) -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/hook"

    def start(self) -> None:
        receiver = self
        verifier = self.verifier or WebhookSigner.from_secrets(parse_secrets(self.secret)).verify

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests += 1
                    receiver.host_headers.append(self.headers.get("host", ""))
                mode = receiver.mode
                if mode == "garbage":
                    self.wfile.write(b"\x00\x01 this is not HTTP at all\r\n\r\n")
                    self.close_connection = True
                    return
                if mode == "hang":
                    time.sleep(receiver.hang_s)
                    self.close_connection = True
                    return
                if mode == "slow":
                    time.sleep(receiver.hang_s)
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    verifier(body, headers)
                except Exception as exc:
                    with receiver.lock:
                        receiver.rejected.append(repr(exc))
                    if receiver.report is not None:
                        receiver.report(f"REJECTED {headers.get('webhook-id', '?')}: {exc}")
                    self._answer(400, b"bad signature")
                    return
                if mode == "fail":
                    self._answer(503, b"down")
                    return
                if mode == "retry_after":
                    self._answer(429, b"slow down", {"Retry-After": "1"})
                    return
                if mode == "gone":
                    self._answer(410, b"gone")
                    return
                if mode == "redirect":
                    self._answer(302, b"", {"Location": receiver.url})
                    return
                payload = json.loads(body)
                got = Received(
                    headers["webhook-id"], payload["type"], payload["data"]["id"], time.time()
                )
                with receiver.lock:
                    receiver.received.append(got)
                if receiver.report is not None:
                    status = payload["data"].get("status")
                    receiver.report(
                        f"verified {got.event} job={got.job_id} status={status} "
                        f"webhook-id={got.msg_id}"
                    )
                if mode == "huge":
                    chunk = b"x" * 65536
                    self.send_response(200)
                    self.send_header("content-length", str(len(chunk) * 1600))  # 100 MiB
                    self.end_headers()
                    try:
                        for _ in range(1600):
                            self.wfile.write(chunk)
                    except OSError:
                        pass  # the sender stopped reading, as it should
                    self.close_connection = True
                    return
                self._answer(200, b"ok")

            def _answer(
                self, code: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        server.allow_reuse_address = True
        self.port = server.server_address[1]
        if self.tls is not None:

            def on_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
                with receiver.lock:
                    receiver.server_names.append(name)

            self.tls.sni_callback = on_sni
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids_by_job(self) -> dict[str, set[str]]:
        with self.lock:
            out: dict[str, set[str]] = {}
            for r in self.received:
                out.setdefault(r.job_id, set()).add(r.msg_id)
            return out


@contextmanager
def receiver(
    secret: str,
    mode: str = "ok",
    verifier: Callable[[bytes, dict[str, str]], object] | None = None,
) -> Iterator[Receiver]:
    r = Receiver(secret, mode=mode, verifier=verifier)
    r.start()
    try:
        yield r
    finally:
        r.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """``python -m webhooks.receiver``: a verifying receiver in the foreground, until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m webhooks.receiver",
        description="Receive inferq webhooks on loopback, verify each signature, print each one.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000, help="port (0: any free one)")
    secret = parser.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret", help="whsec_... (comma-separated while rotating)")
    secret.add_argument(
        "--secret-file",
        type=Path,
        help="a file holding the secret, e.g. the one inferq generates: .inferq/webhook_secret",
    )
    parser.add_argument("--mode", choices=MODES, default="ok", help="misbehave on purpose")
    parser.add_argument(
        "--wait-for-secret",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for --secret-file to appear (default 30)",
    )
    args = parser.parse_args(argv)
    if args.secret_file is not None and not args.secret_file.exists():
        print(f"waiting for {args.secret_file} (inferq writes it when it first starts)", flush=True)
        deadline = time.monotonic() + args.wait_for_secret
        while not args.secret_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    try:
        value = args.secret if args.secret else args.secret_file.read_text()
        parse_secrets(value)
    except OSError as exc:
        parser.exit(
            2, f"cannot read the secret: {exc} (inferq writes it there when it first starts)\n"
        )
    except SecretError as exc:
        parser.exit(2, f"bad secret: {exc}\n")

    def say(line: str) -> None:
        print(line, flush=True)

    r = Receiver(value.strip(), port=args.port, host=args.host, mode=args.mode, report=say)
    try:
        r.start()
    except OSError as exc:
        parser.exit(2, f"cannot listen on {args.host}:{args.port}: {exc}\n")
    stop = threading.Event()
    # Ctrl-C, and SIGTERM; also when started in the background, where SIGINT is ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    say(f"receiving webhooks at {r.url} (mode {args.mode}); Ctrl-C stops")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        r.stop()
    say(f"stopped: {len(r.received)} verified, {len(r.rejected)} rejected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
