"""A small HTTP client for ComfyUI's API: submit a graph, wait, fetch what it made.

Standard library only, so the headless `generate` command needs nothing extra.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ComfyError(RuntimeError):
    """ComfyUI refused a graph or failed while running it; `details` holds its answer."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, Any]
    messages: list = field(default_factory=list)

    def images(self, node_id: str | None = None) -> list[dict]:
        """File records ({filename, subfolder, type}) of the images the graph output."""
        found = []
        for nid, out in self.outputs.items():
            if node_id is None or nid == str(node_id):
                found.extend(out.get("images", []))
        return found

    def texts(self, node_id: str | None = None) -> list[str]:
        found = []
        for nid, out in self.outputs.items():
            if node_id is None or nid == str(node_id):
                found.extend(out.get("text", []))
        return found


class ComfyClient:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plain requests --------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None) -> bytes:
        req = urllib.request.Request(self.base_url + path, data=body, method=method,
                                     headers=headers or {})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post_json(self, path: str, payload: Any) -> Any:
        body = json.dumps(payload).encode()
        try:
            data = self._request("POST", path, body, {"Content-Type": "application/json"})
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                details = json.loads(text)
            except ValueError:
                details = text
            raise ComfyError(_describe_rejection(details), details) from None
        return json.loads(data) if data else None

    def object_info(self, node_type: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_type)}" if node_type else ""))

    # -- running graphs ---------------------------------------------------------------
    def submit(self, graph: dict) -> str:
        """Queue an API-format graph; returns its prompt id. Rejections raise ComfyError."""
        answer = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id})
        return answer["prompt_id"]

    def result(self, prompt_id: str) -> RunResult | None:
        """The prompt's result once it has finished, None while it is queued or running;
        a failed run raises ComfyError with ComfyUI's messages."""
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
        if not entry or entry.get("status", {}).get("completed") is None:
            return None
        status = entry["status"]
        messages = status.get("messages", [])
        if status.get("status_str") == "error":
            raise ComfyError(_describe_failure(messages), messages)
        return RunResult(prompt_id, entry.get("outputs", {}), messages)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> RunResult:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.result(prompt_id)
            if result is not None:
                return result
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, graph: dict, timeout: float = 300.0) -> RunResult:
        return self.wait(self.submit(graph), timeout)

    def fetch(self, file: dict) -> bytes:
        """Bytes of an output file record from RunResult.images()."""
        query = urllib.parse.urlencode({k: file.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request("GET", f"/view?{query}")

    def upload_image(self, path: str | Path, name: str | None = None, overwrite: bool = True,
                     subfolder: str = "") -> str:
        """Upload a file into ComfyUI's input folder (into `subfolder` of it, made if missing);
        returns the name LoadImage takes. Any file goes: POST /upload/image does not check
        that it is an image."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        extra = [(f'--{boundary}\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\n'
                  f'{subfolder}\r\n').encode()] if subfolder else []
        parts = [
            *extra,
            (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
             f'filename="{name or path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
            + path.read_bytes() + b"\r\n",
            (f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\n'
             f'{"true" if overwrite else "false"}\r\n').encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        data = self._request("POST", "/upload/image", b"".join(parts),
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        answer = json.loads(data)
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def _describe_rejection(details: Any) -> str:
    if not isinstance(details, dict):
        return f"ComfyUI rejected the graph: {details}"
    lines = [f"ComfyUI rejected the graph: {details.get('error', {}).get('message', details)}"]
    for node_id, err in (details.get("node_errors") or {}).items():
        for e in err.get("errors", []):
            lines.append(f"  node {node_id} ({err.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def _describe_failure(messages: list) -> str:
    for kind, data in messages:
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
    return f"the graph failed: {messages}"
