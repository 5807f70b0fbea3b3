"""A small fake Hugging Face Hub on 127.0.0.1 that records what huggingface_hub uploads.

It speaks the parts of the Hub HTTP API that ``HfApi.create_repo``, ``create_branch``,
``get_paths_info`` and ``upload_folder`` use on the LFS path (tests set ``HF_HUB_DISABLE_XET=1``): repo
creation, branch creation, README metadata validation, paths-info (size, git blob id, LFS sha256), the
preupload endpoint, the LFS batch endpoint, single-part LFS uploads and the NDJSON commit endpoint.
Every request's method and path is logged; uploaded files are stored per repository and branch.
``fail`` makes chosen requests answer an HTTP error a number of times (transient 5xx, or a 401 for
every call); requests without the expected bearer token get 401.
``hang`` makes chosen requests wait, unanswered, until the server stops; ``error_text`` is put in
every error answer (to check that fusekit never repeats what a server says, e.g. a token).

:func:`raw_server` is a bare TCP server for the failures no HTTP server commits: one that accepts and
never answers, one that drips its answer a byte at a time, one that resets every connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class HubState:
    token: str
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> {"private", "branches"}
    files: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)  # (repo, branch) -> files
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    lfs_paths: set[tuple[str, str, str]] = field(default_factory=set)  # (repo, branch, path) stored by LFS
    requests: list[tuple[str, str]] = field(default_factory=list)
    headers_seen: list[str] = field(default_factory=list)
    fail: dict[str, list[int]] = field(default_factory=dict)  # path substring -> statuses to answer
    hang: list[str] = field(default_factory=list)  # path substrings never answered
    error_text: str = ""  # added to every error answer
    first_request: float | None = None  # time.monotonic() of the first request
    stopped: threading.Event = field(default_factory=threading.Event)
    commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: HubState, base_url: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any = None) -> None:
            if status >= 400 and state.error_text and isinstance(payload, dict):
                payload = {**payload, "error": f"{payload.get('error', '')} {state.error_text}"}
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            body = self._body()
            path = self.path.split("?", 1)[0]
            with state.lock:
                if state.first_request is None:
                    state.first_request = time.monotonic()
                state.requests.append((method, path))
                state.headers_seen.append(" ".join(f"{k}: {v}" for k, v in self.headers.items()))
                for part, statuses in state.fail.items():
                    if part in path and statuses:
                        status = statuses.pop(0)
                        self._send(status, {"error": f"fake hub: injected {status}"})
                        return
            if any(part in path for part in state.hang):
                state.stopped.wait()  # no answer until the server stops
                return
            if self.headers.get("Authorization") != f"Bearer {state.token}" and not path.startswith("/lfs/"):
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return
            try:
                self._route(method, path, body)
            except Exception as exc:  # a bug in the fake: answer 500 with the reason
                self._send(500, {"error": f"fake hub: {type(exc).__name__}: {exc}"})

        def _route(self, method: str, path: str, body: bytes) -> None:
            parts = path.strip("/").split("/")
            if method == "POST" and path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                with state.lock:
                    if repo_id in state.repos:
                        self._send(409, {"error": "You already created this model repo",
                                         "url": f"{base_url[0]}/{repo_id}"})
                        return
                    state.repos[repo_id] = {"private": payload.get("visibility") == "private",
                                            "branches": {"main"}}
                self._send(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})
            elif method == "POST" and path == "/api/validate-yaml":
                self._send(200, {"errors": [], "warnings": []})
            elif method == "POST" and parts[:2] == ["api", "models"] and parts[4:5] == ["branch"]:
                repo_id, branch = "/".join(parts[2:4]), "/".join(parts[5:])
                with state.lock:
                    state.repos[repo_id]["branches"].add(branch)
                self._send(200, {})
            elif method == "POST" and parts[:2] == ["api", "models"] and parts[4:5] == ["paths-info"]:
                repo_id = "/".join(parts[2:4])
                branch = urllib.parse.unquote("/".join(parts[5:]))
                asked = urllib.parse.parse_qs(body.decode()).get("paths", [])
                held = state.files.get((repo_id, branch), {})
                self._send(200, [_path_info(repo_id, branch, path, held[path], state)
                                 for path in asked if path in held])
            elif method == "POST" and parts[:2] == ["api", "models"] and parts[4:5] == ["preupload"]:
                files = json.loads(body)["files"]
                self._send(200, {"files": [
                    {"path": f["path"], "shouldIgnore": False,
                     "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                    for f in files]})
            elif method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                objects = json.loads(body)["objects"]
                self._send(200, {"transfer": "basic", "objects": [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{base_url[0]}/lfs/{o['oid']}"}}}
                    for o in objects]})
            elif method == "PUT" and parts[0] == "lfs":
                oid = parts[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    self._send(400, {"error": "sha256 mismatch"})
                    return
                with state.lock:
                    state.lfs[oid] = body
                self._send(200, {})
            elif method == "POST" and parts[:2] == ["api", "models"] and parts[4:5] == ["commit"]:
                repo_id, branch = "/".join(parts[2:4]), "/".join(parts[5:])
                stored: dict[str, bytes] = {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        stored[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        stored[value["path"]] = state.lfs[value["oid"]]
                        state.lfs_paths.add((repo_id, branch, value["path"]))
                with state.lock:
                    if repo_id not in state.repos or branch not in state.repos[repo_id]["branches"]:
                        self._send(404, {"error": f"{repo_id}@{branch} not found"})
                        return
                    state.files.setdefault((repo_id, branch), {}).update(stored)
                    state.commits += 1
                    oid = hashlib.sha1(str(state.commits).encode()).hexdigest()
                self._send(200, {"commitUrl": f"{base_url[0]}/{repo_id}/commit/{oid}",
                                 "commitOid": oid})
            else:
                self._send(404, {"error": f"fake hub: no route for {method} {path}"})

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._handle("PUT")

    return Handler


def _path_info(repo_id: str, branch: str, path: str, data: bytes, state: HubState) -> dict[str, Any]:
    """One paths-info entry as the Hub answers it: size, git blob id, and LFS oid for LFS files."""
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data),
                             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if (repo_id, branch, path) in state.lfs_paths:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


@contextmanager
def fake_hub(token: str) -> Iterator[tuple[str, HubState]]:
    """Serve a fake Hub on a free port of 127.0.0.1; yield its URL and its recorded state."""
    state = HubState(token=token)
    base_url: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, base_url))
    base_url.append(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base_url[0], state
    finally:
        state.stopped.set()
        server.shutdown()
        server.server_close()


@dataclass
class RawServer:
    url: str
    connections: int = 0
    first_request: float | None = None  # time.monotonic() of the first connection


def _serve_raw(conn: socket.socket, behaviour: str, stop: threading.Event) -> None:
    """One connection: "silent" reads and never answers, "drip" sends a status line and then
    one header byte every 0.2 s, "reset" closes at once with a TCP reset."""
    with conn:
        if behaviour == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        conn.settimeout(0.1)
        if behaviour == "drip":
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        while not stop.wait(0.2):
            try:
                if behaviour == "drip":
                    conn.sendall(b"a")
                elif not conn.recv(65536):
                    return  # the client gave up
            except TimeoutError:
                continue
            except OSError:
                return


@contextmanager
def raw_server(behaviour: str) -> Iterator[RawServer]:
    """A TCP server on a free port of 127.0.0.1 that misbehaves as ``behaviour`` says
    ("silent", "drip" or "reset"); it stops, with all its connections, when the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    info = RawServer(url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            info.connections += 1
            if info.first_request is None:
                info.first_request = time.monotonic()
            thread = threading.Thread(target=_serve_raw, args=(conn, behaviour, stop), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield info
    finally:
        stop.set()
        acceptor.join(5)
        for thread in threads:
            thread.join(5)
        listener.close()
