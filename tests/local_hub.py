"""A Hub-compatible HTTP server on 127.0.0.1 for tests: the real huggingface_hub client pushes and loads against it.

It implements the routes that `create_repo`, `create_branch`, `create_commit` (inline "regular" uploads, no LFS or
Xet), `model_info`, `list_repo_tree` and `hf_hub_download` use, with git-like branches and commits held in memory.
Tokens: `WRITE_TOKEN` may write, `READ_TOKEN` may only read, any other token is rejected (401). Failures can be
injected per route; requests the server does not know are recorded in `unhandled` so a test can assert none.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

WRITE_TOKEN = "hf_local_write_token"
READ_TOKEN = "hf_local_read_token"
USER = "tester"

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/{REV}$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/{REV}$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{REPO}/branch/{REV}$"), "create_branch"),
    ("GET", re.compile(rf"^/api/models/{REPO}/tree/{REV}(?P<path>/.*)?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/{REV})?$"), "model_info"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/{REV}/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/{REV}/(?P<path>.+)$"), "resolve"),
]


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.extra, self.headers = extra or {}, headers or {}


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    """Answer the next `times` requests of a route with `status`, or (status=None) drop the connection mid-body."""

    status: int | None
    times: int = 1


class LocalHub:
    """In-memory Hub state plus the HTTP server that serves it (one per test)."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[str] = []
        self.failures: dict[str, Failure] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def fail(self, route: str, status: int | None, times: int = 1) -> None:
        self.failures[route] = Failure(status, times)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[self._resolve(repo, revision)]

    def _resolve(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, parent: str | None, changes: dict[str, bytes], message: str) -> str:
        files = dict(repo.commits[parent]) if parent else {}
        files.update(changes)
        digest = hashlib.sha1(f"{parent}\n{message}".encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha], repo.messages[sha] = files, message
        return sha


def _etag(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def _user(self, write: bool) -> str | None:
            header = self.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
            if token is None:
                if write:
                    raise HubError(401, "You must be authenticated to write")
                return None
            if token not in (WRITE_TOKEN, READ_TOKEN):
                raise HubError(401, "Invalid credentials in Authorization header")
            if write and token != WRITE_TOKEN:
                raise HubError(403, "This token has read access only; you don't have the rights to write")
            return USER

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            for route_method, pattern, name in ROUTES:
                match = pattern.match(url.path)
                if route_method == method and match:
                    break
            else:
                hub.unhandled.append(f"{method} {self.path}")
                self._drain()
                return self._send(501, {"error": f"local hub does not implement {method} {url.path}"})
            body = self._read_body(name)
            if body is None:
                return
            try:
                failure = hub.failures.get(name)
                if failure is not None and failure.times > 0:
                    failure.times -= 1
                    raise HubError(failure.status, "Internal Error - we're working hard to fix this")
                with hub._lock:
                    status, payload, headers = getattr(self, f"_{name}")(
                        body=body, query=parse_qs(url.query), **{k: v for k, v in match.groupdict().items() if v}
                    )
            except HubError as error:
                headers = {"X-Error-Message": error.message, **error.headers}
                if error.error_code:
                    headers["X-Error-Code"] = error.error_code
                status, payload = error.status, {"error": error.message, **error.extra}
            hub.requests.append((method, url.path, status))
            self._send(status, payload, headers, head=method == "HEAD")

        def _drain(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _read_body(self, route: str) -> bytes | None:
            length = int(self.headers.get("Content-Length") or 0)
            failure = hub.failures.get(route)
            if failure is not None and failure.status is None and failure.times > 0:
                failure.times -= 1
                self.rfile.read(length // 2)
                hub.requests.append(("POST", route, 0))
                self.close_connection = True
                self.connection.close()
                return None
            return self.rfile.read(length)

        def _send(self, status: int, payload, headers: dict | None = None, head: bool = False):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _create_repo(self, body, query):
            user = self._user(write=True)
            request = json.loads(body)
            repo_id = f"{request.get('organization') or user}/{request['name']}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            repo = Repo(private=request.get("visibility") == "private" or bool(request.get("private")))
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.branches["main"] = hub._commit(repo, None, {".gitattributes": gitattributes}, "initial commit")
            hub.repos[repo_id] = repo
            return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

        def _validate_yaml(self, body, query):
            return 200, {"errors": [], "warnings": []}, {}

        def _whoami(self, body, query):
            return 200, {"name": self._user(write=False), "type": "user", "orgs": []}, {}

        def _agent_harnesses(self, body, query):
            """The client's best-effort telemetry registry: an empty one disables agent detection."""
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}

        def _preupload(self, body, query, repo, rev):
            self._repo_for_write(repo)
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return 200, {"files": modes}, {}

        def _commit(self, body, query, repo, rev):
            target = self._repo_for_write(repo)
            branch = unquote(rev)
            if branch not in target.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            changes = {}
            for line in lines:
                if line["key"] == "file":
                    changes[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] != "header":
                    raise HubError(400, f"local hub supports only inline file additions, got {line['key']}")
            sha = hub._commit(target, target.branches[branch], changes, header["summary"])
            target.branches[branch] = sha
            return 200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo}/commit/{sha}"}, {}

        def _create_branch(self, body, query, repo, rev):
            target = self._repo_for_write(repo)
            branch = unquote(rev)
            if branch in target.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            target.branches[branch] = hub._resolve(target, start)
            return 200, {}, {}

        def _tree(self, body, query, repo, rev, path=""):
            target = hub._repo(repo, self._user(write=False))
            files = target.commits[hub._resolve(target, rev)]
            prefix = path.strip("/")
            entries = [
                {"type": "file", "path": name, "size": len(content), "oid": _etag(content)}
                for name, content in sorted(files.items())
                if not prefix or name.startswith(prefix + "/")
            ]
            return 200, entries, {}

        def _model_info(self, body, query, repo, rev="main"):
            target = hub._repo(repo, self._user(write=False))
            sha = hub._resolve(target, rev)
            siblings = [{"rfilename": name} for name in sorted(target.commits[sha])]
            return 200, {"id": repo, "modelId": repo, "sha": sha, "private": target.private, "siblings": siblings}, {}

        def _resolve(self, body, query, repo, rev, path):
            target = hub._repo(repo, self._user(write=False))
            sha = hub._resolve(target, rev)
            content = target.commits[sha].get(unquote(path))
            if content is None:
                raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_etag(content)}"'}
            return 200, content, headers

        def _repo_for_write(self, repo_id: str) -> Repo:
            return hub._repo(repo_id, self._user(write=True))

    return Handler

