"""A local stand-in for the parts of the Hugging Face Hub API that huggingface_hub 2.4's create_repo and
upload_folder call, so that `se-compress push` runs the real client code in tests (the Hub is unreachable here).

Endpoints (read from huggingface_hub/hf_api.py, _commit_api.py, lfs.py, _upload_pipeline.py):
- POST /api/validate-yaml                      {"content": README.md, "repoType"}: the card metadata, checked below
- POST /api/repos/create                        {"name", "organization", "visibility"?, "type"} -> {"url"}; 409 if it exists
- POST /api/models/{org}/{name}/preupload/{rev} {"files": [{"path", "sample", "size"}]} -> upload mode per file
- POST /{org}/{name}.git/info/lfs/objects/batch LFS batch API (basic transfer) -> an upload and a verify URL per object
- PUT  /lfs-objects/{oid}                       the bytes of one LFS object (sha256 checked)
- POST /lfs-verify                              {"oid", "size"}
- POST /api/models/{org}/{name}/commit/{rev}    NDJSON: header, then "file" (base64) and "lfsFile" (oid) lines
The metadata checks are the Hub's documented rules for the keys se_compress writes (a mapping; base_model a
repo id or a list of them; base_model_relation one of adapter/merge/quantized/finetune and only with base_model;
library_name, license and pipeline_tag strings; tags a list of strings). Everything it receives is recorded; every request must carry `Authorization: Bearer <token>`.

`lfs_suffixes`: files whose name ends so are answered "lfs" at preupload (the Hub does that for *.safetensors).
With hf_xet installed, huggingface_hub uploads "lfs" files through Xet storage, which this stand-in does not
implement: run such clients with HF_HUB_DISABLE_XET=1 (the LFS protocol), or with lfs_suffixes=() (all regular).
Bound to 127.0.0.1 only, on a free port; each connection times out after 30 s.
"""
import base64
import hashlib
import json
import re
import threading

import yaml
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStandIn:
    def __init__(self, token: str, lfs_suffixes=(".safetensors",)):
        self.token = token
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.repos: dict[str, dict] = {}  # repo_id -> {"visibility", "files": {path: bytes}, "commits": [...]}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.unauthorized: list[str] = []
        self.validated_cards: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # ---- request handling ----------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # seconds a connection may stay idle
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, payload=None):
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                with hub.lock:
                    hub.unauthorized.append(self.path)
                self._reply(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def do_POST(self):
                body = self._body()
                with hub.lock:
                    hub.requests.append(("POST", self.path))
                if not self._authorized():
                    return
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(body))
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    return self._preupload(m.group(1), json.loads(body))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    return self._commit(m.group(1), body)
                if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                    return self._lfs_batch(m.group(1), json.loads(body))
                if path == "/lfs-verify":
                    info = json.loads(body)
                    ok = len(hub.lfs_objects.get(info["oid"], b"")) == info["size"] and info["oid"] in hub.lfs_objects
                    return self._reply(200 if ok else 404, {"ok": ok})
                self._reply(404, {"error": f"stand-in has no POST {path}"})

            def do_PUT(self):
                body = self._body()
                with hub.lock:
                    hub.requests.append(("PUT", self.path))
                m = re.fullmatch(r"/lfs-objects/([0-9a-f]{64})", self.path)
                if not m:  # LFS uploads go to pre-signed URLs: no token on the real Hub either
                    return self._reply(404, {"error": f"stand-in has no PUT {self.path}"})
                if hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._reply(400, {"error": "sha256 mismatch"})
                with hub.lock:
                    hub.lfs_objects[m.group(1)] = body
                self._reply(200, {})

            def do_GET(self):
                with hub.lock:
                    hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"stand-in has no GET {self.path}"})

            def do_HEAD(self):  # e.g. the base model's README.md: there is none here
                with hub.lock:
                    hub.requests.append(("HEAD", self.path))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _validate_yaml(self, info):
                content = info["content"]
                with hub.lock:
                    hub.validated_cards.append(content)
                errors = metadata_errors(content)
                self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

            def _create(self, info):
                repo_id = f"{info.get('organization')}/{info['name']}"
                with hub.lock:
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                    hub.repos[repo_id] = {"visibility": info.get("visibility"), "type": info.get("type"),
                                          "files": {}, "commits": []}
                self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

            def _preupload(self, repo_id, info):
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes) and f["size"] > 0
                          else "regular", "shouldIgnore": False, "oid": None} for f in info["files"]]
                self._reply(200, {"files": files, "commitOid": "0" * 40})

            def _lfs_batch(self, repo_id, info):
                objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.endpoint}/lfs-objects/{o['oid']}"},
                                        "verify": {"href": f"{hub.endpoint}/lfs-verify"}}}
                           for o in info["objects"]]
                self._reply(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo_id, body):
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                received = {}
                for item in lines[1:]:
                    value = item["value"]
                    if item["key"] == "file":
                        received[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            return self._reply(422, {"error": f"LFS object of {value['path']} was never uploaded"})
                        received[value["path"]] = hub.lfs_objects[value["oid"]]
                    else:
                        return self._reply(400, {"error": f"stand-in does not implement {item['key']}"})
                oid = hashlib.sha1(body).hexdigest()
                with hub.lock:
                    hub.repos[repo_id]["files"].update(received)
                    hub.repos[repo_id]["commits"].append({"header": lines[0]["value"], "paths": sorted(received)})
                self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                  "success": True})

        return Handler


REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def metadata_errors(readme: str) -> list[str]:
    """The Hub's rules for the model-card metadata keys se_compress writes; [] when valid."""
    if not readme.startswith("---\n"):
        return ["no YAML metadata block"]
    end = readme.find("\n---", 4)
    try:
        meta = yaml.safe_load(readme[4:end])
    except yaml.YAMLError as exc:
        return [f"YAML does not parse: {exc}"]
    if not isinstance(meta, dict):
        return ["metadata is not a mapping"]
    errors = []
    base = meta.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    errors += [f'"base_model" must be a Hub repo id, got {b!r}' for b in bases if not (isinstance(b, str) and REPO_ID.match(b))]
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)}, got {relation!r}')
        if not bases:
            errors.append('"base_model_relation" needs "base_model"')
    for key in ("library_name", "license", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    tags = meta.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be a list of strings')
    return errors
