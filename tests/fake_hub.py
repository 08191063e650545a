"""A Hugging Face hub endpoint on 127.0.0.1 for tests: the parts of the hub's HTTP API that
`huggingface_hub` downloads use (repo info with its file list, `resolve/` HEAD and GET),
gated repos answering 401/403 with the hub's `X-Error-Code: GatedRepo`, unknown ones
`RepoNotFound`. Point HF_ENDPOINT at `url`."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "a" * 40


class FakeHub:
    def __init__(
        self, repos: dict[str, dict[str, bytes]], gated: set[str] = frozenset(), token: str = ""
    ) -> None:
        self.repos, self.gated, self.token = repos, set(gated), token
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def downloaded(self) -> set[str]:
        """File names fetched with GET (not HEAD)."""
        return {
            p.split("/resolve/")[1].split("/", 1)[1]
            for m, p in self.requests
            if m == "GET" and "/resolve/" in p
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo = "/".join(parts[2:4])
                if self._allowed(repo):
                    siblings = [{"rfilename": f} for f in hub.repos[repo]]
                    info = {"id": repo, "sha": COMMIT, "siblings": siblings}
                    self._send(200, json.dumps(info).encode(), {}, body)
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                if not self._allowed(repo):
                    return
                if name not in hub.repos[repo]:
                    self._error(404, "EntryNotFound", f"{name} not found")
                    return
                data = hub.repos[repo][name]
                etag = hashlib.sha256(data).hexdigest()
                self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, body)
                return
            self._error(404, "RepoNotFound", "Repository not found")

        def _allowed(self, repo: str) -> bool:
            if repo not in hub.repos:
                self._error(401, "RepoNotFound", "Repository not found")
                return False
            auth = self.headers.get("authorization")
            if repo in hub.gated and auth != f"Bearer {hub.token}":
                self._error(403 if auth else 401, "GatedRepo", f"Access to {repo} is restricted")
                return False
            return True

        def _error(self, code: int, kind: str, message: str) -> None:
            self._send(code, b"", {"X-Error-Code": kind, "X-Error-Message": message}, False)

        def _send(self, code: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

    return Handler
