"""A local stand-in for the Hugging Face Hub API, just enough for the real huggingface_hub client.

    with LocalHub(token="hf_test_...") as hub:      # HF_ENDPOINT=hub.endpoint in the client's environment
        ...                                          # run create_repo / upload_folder / add_space_variable
        hub.files["alice/demo-sft"]["README.md"]     # bytes that arrived

Implements what huggingface_hub 2.4 calls to create repos and commit small files (see
/work/shared/HF-NOTES.md): POST /api/repos/create, /api/validate-yaml, /api/<type>s/<id>/preupload/<rev>
(every file "regular", so no LFS/Xet transfer), /api/<type>s/<id>/commit/<rev> (NDJSON, base64 files),
/api/spaces/<id>/variables (POST and DELETE), GET /api/<type>s/<id> (repo info) and HEAD/GET .../resolve/<rev>/<path>.
Records every request (method, path, headers), the repos, their files and Space variables. With a
`token`, requests without `Authorization: Bearer <token>` get 401, as the Hub answers a bad token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
TYPE = r"(?P<type>models|spaces|datasets)"


class LocalHub:
    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"type", "visibility", "sdk", ...}
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.commits: list[dict] = []  # {"repo", "message", "paths"}
        self.variables: dict[str, dict[str, str]] = {}  # Space id -> key -> value
        self.requests: list[dict] = []  # {"method", "path", "headers"} (headers lower-cased)
        self.validated_yaml: list[dict] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        hub = self

        class Handler(HubHandler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def card(self, repo_id: str) -> tuple[dict, str]:
        """(YAML metadata, body) of a repo's README.md."""
        return split_front_matter(self.files[repo_id]["README.md"].decode("utf-8"))


def split_front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    if not match:
        return {}, text
    return yaml.safe_load(match.group(1)) or {}, match.group(2)


class HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub

    def log_message(self, *args):  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append(
                {"method": self.command, "path": path, "headers": {k.lower(): v for k, v in self.headers.items()}}
            )
        return path

    def _authorized(self) -> bool:
        if self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}":
            return True
        self._send(
            401,
            {"error": "Invalid credentials in Authorization header"},
            {"X-Error-Message": "Invalid credentials in Authorization header"},
        )
        return False

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type in ("model", "models") else f"{repo_type.rstrip('s')}s/"
        return f"{self.hub.endpoint}/{prefix}{repo_id}"

    # --- routes ---------------------------------------------------------------------------------
    def do_POST(self):
        path = self._record()
        body = self._body()
        if not self._authorized():
            return
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if m := re.fullmatch(rf"/api/{TYPE}/{REPO}/preupload/(?P<rev>[^/]+)", path):
            files = json.loads(body)["files"]
            return self._send(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if m := re.fullmatch(rf"/api/{TYPE}/{REPO}/commit/(?P<rev>[^/]+)", path):
            return self._commit(m["type"], m["repo"], body)
        if m := re.fullmatch(rf"/api/spaces/{REPO}/variables", path):
            data = json.loads(body)
            with self.hub.lock:
                variables = self.hub.variables.setdefault(m["repo"], {})
                variables[data["key"]] = data["value"]
                answer = {k: {"value": v} for k, v in variables.items()}
            return self._send(200, answer)
        self._send(404, {"error": f"no route for POST {path}"})

    def do_GET(self):
        path = self._record()
        if not self._authorized():
            return
        if m := re.fullmatch(rf"/api/{TYPE}/{REPO}(/revision/.*)?", path):
            repo = self.hub.repos.get(m["repo"])
            if repo is None:
                return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": p} for p in self.hub.files.get(m["repo"], {})]
            return self._send(
                200,
                {
                    "id": m["repo"],
                    "sha": repo.get("sha", "0" * 40),
                    "private": repo.get("visibility") == "private",
                    "siblings": siblings,
                },
            )
        if m := re.fullmatch(rf"/(?:spaces/|datasets/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
            content = self.hub.files.get(m["repo"], {}).get(m["file"])
            if content is None:
                return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            repo = self.hub.repos.get(m["repo"], {})
            etag = hashlib.sha1(content).hexdigest()
            return self._send(
                200, raw=content, headers={"ETag": f'"{etag}"', "X-Repo-Commit": repo.get("sha", "0" * 40)}
            )
        self._send(404, {"error": f"no route for GET {path}"})

    do_HEAD = do_GET

    def do_DELETE(self):
        path = self._record()
        body = self._body()
        if not self._authorized():
            return
        if m := re.fullmatch(rf"/api/spaces/{REPO}/variables", path):
            with self.hub.lock:
                variables = self.hub.variables.setdefault(m["repo"], {})
                variables.pop(json.loads(body)["key"], None)
                answer = {k: {"value": v} for k, v in variables.items()}
            return self._send(200, answer)
        self._send(404, {"error": f"no route for DELETE {path}"})

    def _create_repo(self, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        repo_type = payload.get("type") or "model"
        url = self._repo_url(repo_type, repo_id)
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(409, {"error": "You already created this repo", "url": url})
            self.hub.repos[repo_id] = {
                "type": repo_type,
                "visibility": payload.get("visibility"),
                "sdk": payload.get("sdk"),
            }
            self.hub.files[repo_id] = {}
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict):
        """Like the Hub: the README's front matter must parse as a YAML mapping."""
        text = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if not isinstance(metadata, dict):
            return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
        with self.hub.lock:
            self.hub.validated_yaml.append(metadata)
        self._send(200, {})

    def _commit(self, repo_type: str, repo_id: str, body: bytes):
        if repo_id not in self.hub.repos:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        message, paths = "", []
        with self.hub.lock:
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item.get("value", {})
                if item.get("key") == "header":
                    message = value.get("summary", "")
                elif item.get("key") == "file":
                    content = value["content"]
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    self.hub.files[repo_id][value["path"]] = data
                    paths.append(value["path"])
                elif item.get("key") == "deletedFile":
                    self.hub.files[repo_id].pop(value["path"], None)
            oid = hashlib.sha1(f"{repo_id}{len(self.hub.commits)}".encode()).hexdigest()
            self.hub.repos[repo_id]["sha"] = oid
            self.hub.commits.append({"repo": repo_id, "message": message, "paths": paths})
        self._send(200, {"commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{oid}", "commitOid": oid})
