"""Servers for the remote-root tests, on 127.0.0.1 only, started and stopped by fixtures.

- `FaultyHTTPServer`: serves a directory over HTTP/1.1 with Range requests, HEAD and
  directory listings, counts requests and body bytes per path, and injects faults per path:
  "drop" (headers promise the whole body, half is sent, the connection is closed), "503",
  "flip" (one byte of the body flipped), "hang" (no answer for `hang_s` seconds). Each
  fault is consumed once per request; `faults[path]` is a list, so ["503"] * 3 is a burst,
  and a fault named "always-<fault>" is never consumed.
- `moto_s3()`: moto's threaded S3 server on a free port and the s3fs storage options that
  reach it.
- `gcs_emulator()`: gcp-storage-emulator's in-memory GCS server on a free port and the
  gcsfs storage options that reach it (anonymous).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _fault(self) -> str | None:
        srv: FaultyHTTPServer = self.server  # type: ignore[assignment]
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests[path] += 1
            queue = srv.faults.get(path)
            if queue:
                head = queue[0]
                return head[len("always-"):] if head.startswith("always-") else queue.pop(0)
        return None

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv: FaultyHTTPServer = self.server  # type: ignore[assignment]
        fault = None if head else self._fault()
        if fault == "hang":
            end = time.monotonic() + srv.hang_s
            while time.monotonic() < end and not srv.stopping.is_set():
                time.sleep(0.05)
            self.close_connection = True
            return
        if fault == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        local = Path(self.translate_path(self.path))
        if local.is_dir():
            if not self.path.split("?", 1)[0].endswith("/"):
                self.send_response(301)
                self.send_header("Location", self.path + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = "".join(f'<a href="{p.name}{"/" if p.is_dir() else ""}">{p.name}</a>\n'
                           for p in sorted(local.iterdir()) if not p.name.startswith("."))
            data = f"<html><body>\n{body}</body></html>".encode()
            self._send(200, data, "text/html", head)
            return
        if not local.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = local.read_bytes()
        status, total = 200, len(data)
        rng = self.headers.get("Range")
        extra = {"Accept-Ranges": "bytes"}
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m:
                a = int(m.group(1)) if m.group(1) else max(0, total - int(m.group(2)))
                b = int(m.group(2)) if m.group(1) and m.group(2) else total - 1
                b = min(b, total - 1)
                data, status = data[a:b + 1], 206
                extra["Content-Range"] = f"bytes {a}-{b}/{total}"
        if fault == "flip" and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        if fault == "drop":
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        self._send(status, data, "application/octet-stream", head, extra)

    def _send(self, status: int, data: bytes, ctype: str, head: bool,
              extra: dict | None = None) -> None:
        srv: FaultyHTTPServer = self.server  # type: ignore[assignment]
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", ctype)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            if srv.bytes_per_s:  # a slow link: sleeps, so the server takes no CPU meanwhile
                for i in range(0, len(data), 1 << 16):
                    self.wfile.write(data[i:i + (1 << 16)])
                    time.sleep(min(len(data) - i, 1 << 16) / srv.bytes_per_s)
            else:
                self.wfile.write(data)
            with srv.lock:
                srv.bytes_served[self.path.split("?", 1)[0]] += len(data)


class FaultyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, hang_s: float = 5.0, bytes_per_s: float = 0.0):
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.root = Path(root)
        self.lock = threading.Lock()
        self.faults: dict[str, list[str]] = {}
        self.requests: Counter = Counter()
        self.bytes_served: defaultdict[str, int] = defaultdict(int)
        self.hang_s = hang_s
        self.bytes_per_s = bytes_per_s  # > 0: bodies are sent at this rate per connection
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FaultyHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()
            self.bytes_served.clear()

    def shard_bytes(self) -> int:
        with self.lock:
            return sum(v for k, v in self.bytes_served.items() if k.endswith(".tar"))

    def shard_gets(self) -> Counter:
        with self.lock:
            return Counter({k: v for k, v in self.requests.items() if k.endswith(".tar")})


@contextlib.contextmanager
def moto_s3():
    """(endpoint URL, storage options for s3fs) of a moto S3 server on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    # Never let botocore look for credentials or regions outside this process.
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"}}
    try:
        yield endpoint, opts
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local: Path, url: str, storage_options: dict) -> None:
    """Copy a local dataset directory to s3://bucket/prefix (the bucket is created)."""
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    bucket = url[len("s3://"):].split("/", 1)[0]
    client = boto3.client("s3", endpoint_url=storage_options["endpoint_url"],
                          region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url[len('s3://'):]}/{p.relative_to(local).as_posix()}")
    fs.invalidate_cache()


@contextlib.contextmanager
def gcs_emulator(bucket: str = "midas"):
    """(storage options for gcsfs) of an in-memory GCS emulator on 127.0.0.1 holding `bucket`.

    Recent gcsfs registers, by default, a file system whose bucket-type probe asks a gRPC
    endpoint the emulator does not have (and waits a minute per bucket); the plain
    GCSFileSystem is registered for gs:// while the emulator runs."""
    import fsspec
    import gcsfs.core
    from gcp_storage_emulator.server import create_server

    registered = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for p in registered:
        fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}
    finally:
        server.stop()
        for p, cls in registered.items():
            fsspec.register_implementation(p, cls, clobber=True)


def upload_gcs(local: Path, url: str, storage_options: dict) -> None:
    """Copy a local dataset directory to gs://bucket/prefix (the bucket exists)."""
    import gcsfs.core

    fs = gcsfs.core.GCSFileSystem(**storage_options)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url[len('gs://'):]}/{p.relative_to(local).as_posix()}")
    fs.invalidate_cache()
