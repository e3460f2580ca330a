"""The demo: a local page where a user drops in a video (or picks a synthetic test video), asks when
something happens, and sees the answer's evidence on the video's timeline. docs/demo.md.

    python demo.py                          the newest checkpoint of runs/default (FPO, else SFT)
    python demo.py --ckpt DIR [--port 7860] [--host 127.0.0.1] [--max-new-tokens N] [--set FIELD=VALUE]
    python demo.py --ckpt RELEASED_DIR --qformer-tokenizer BERT_DIR   the released D2VLM, on the GPU
                                            when there is one (as evaluate.py runs it)

One process: the standard library's HTTP server, whose threads only parse, check and wait, and one
worker thread that runs the model (it is not thread-safe), taking questions in the order they came
from a queue: a second user's question waits its turn, and the page says how many are ahead of it.

    GET  /                    the page (demo.html: one HTML file, inline CSS and JS, nothing fetched elsewhere)
    GET  /videos/NAME         a synthetic test video, with byte ranges (the player seeks with them)
    POST /api/upload?name=N   a video file's bytes -> {"upload": id}; kept in the server's temporary
                              folder (the newest KEPT_UPLOADS), which goes when the server stops
    POST /api/ask             {"video": {"upload": id} | {"synthetic": NAME}, "question": text}
                              -> {"job": id, "ahead": questions before it}
    GET  /api/job/ID          {"state": "queued", "ahead"} | {"state": "running"} | {"state": "done",
                              "answer"} | {"state": "error", "message"}: bad input is one line on the
                              page, and the server goes on serving
"""
from __future__ import annotations

import base64
import io
import ipaddress
import itertools
import json
import mimetypes
import queue
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image

import checkpoint
import data
import evaluate
import event_videos
from config import configure
from evidence import EVI, EVI_END
from support import cli

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860  # this machine only; Gradio's port, the field's habit
MAX_PORT = 65535
MAX_UPLOAD_BYTES = 2 << 30   # 2 GiB, an hour of 720p at 4 Mbit/s; a larger file is refused before it is read
MAX_REQUEST_BYTES = 1 << 20  # a question's JSON: room for data.MAX_TEXT_CHARS characters of any kind, so
                             # that data.check_text refuses an over-long question with its count
MAX_NAME_CHARS = 200         # of an uploaded file's name as the page shows it
KEPT_UPLOADS = 16            # uploads kept on disk, the newest (one a waiting question reads is never removed)
KEPT_ANSWERS = 64            # finished questions kept for their page to read, the newest
CHUNK = 1 << 20              # bytes read or sent at a time
THUMBS_PER_EVI = 6           # frames shown for each <evi>: its span's, evenly spread
THUMB_QUALITY = 85           # JPEG quality of those frames
PROB_DIGITS = 4              # the similarity curves, as sent to the page
LENGTH_SLACK = 0.05          # seconds the probe's last frame time and the sampler's may differ by (rounding)
POLL_MS = 300                # how often the page asks how its question is doing
IDLE_S = 120                 # seconds a connection may stay silent (a stalled upload) before it is dropped
DEMO_HEADER = "X-D2VLM-Demo"  # every POST carries it: another site's page cannot send it without a CORS
                              # preflight, which this server never grants
RANGE = re.compile(r"bytes=(\d*)-(\d*)")  # one byte range, as players ask for them
TASK_NAMES = {"tvg": "find an event", "epm": "when did I see it", "tal": "every moment of an action",
              "evs": "key segments", "vhd": "the highlight", "dvc": "describe every event",
              "slc": "steps of the procedure"}  # the example questions' buttons, one per synthetic task
PAGE = Path(__file__).with_name("demo.html")  # the page: one HTML file, inline CSS and JS
NO_CHECKPOINT = (f"no checkpoint under {checkpoint.DEFAULT_RUN}: make one with `torchrun train.py --stage sft` "
                 "(then `torchrun train.py --stage fpo`, as the README's quickstart), or give --ckpt DIR")


# ---------------------------------------------------------------------------------------------
# The model's side: one question about one video

class Answerer:
    """The model of a checkpoint and what one answer takes: the checks and frames of
    evaluate.video_question, the length check, evaluate.answer_video, the thumbnails. Called by the
    worker thread only."""

    def __init__(self, ckpt, args):
        cfg = configure(checkpoint.read_config(ckpt), args.set)
        self.tokenizer = checkpoint.tokenizer_of(ckpt, args.vision_weights, args.llm_weights)
        self.model = evaluate.load_model(ckpt, args, cfg, self.tokenizer)
        self.cfg, self.device = self.model.cfg, str(next(self.model.parameters()).device)
        self.max_new = args.max_new_tokens or evaluate.DEFAULT_DECODING["max_new_tokens"]

    def __call__(self, path: Path, question: str) -> dict:
        """The answer to `question` about the video at `path`, as the page draws it: text, spans
        (seconds, generate's), probs (rounded), each <evi>'s frames and their thumbnails, timings.
        SystemExit or ValueError naming `path` on bad input."""
        fps, t0 = self.cfg.fps, time.perf_counter()
        sample = evaluate.video_question(path, question, self.cfg, self.tokenizer, self.max_new)
        n, end = len(sample["frames"]), sample["end"]
        if end >= n / fps + LENGTH_SLACK:  # video_question reads the first frames that fit: an answer about
            # the start alone would pass for one about the whole video, so the demo refuses, as evaluation does
            raise ValueError(f"{path}: {end:.1f} s long, more than this model sees: {n} frames at {fps:g} fps "
                             f"({n / fps:g} s) fit in max_len={self.cfg.max_len} beside this question and "
                             f"{self.max_new} new tokens; cut the video to {n / fps:g} s or less")
        t1 = time.perf_counter()
        out = evaluate.answer_video(self.model, sample, self.max_new)
        t2 = time.perf_counter()
        picks, images = thumbnails(sample["frames"], out["spans"], fps)
        return {"text": out["text"], "spans": out["spans"], "stopped": out["stopped"], "tokens": len(out["tokens"]),
                "probs": [[round(p, PROB_DIGITS) for p in row] for row in out["probs"]], "fps": fps, "frames": n,
                "timeline_s": n / fps, "picks": picks, "images": images, "read_s": t1 - t0, "generate_s": t2 - t1,
                "max_new_tokens": self.max_new}


def thumbnails(frames, spans, fps) -> tuple:
    """(for each span, the indices of the frames shown for it: its own, at most THUMBS_PER_EVI,
    evenly spread; {index: JPEG data URL} of each frame shown once). frames: uint8 (T, 3, S, S), the
    frames the model saw; spans: [[start, end], ...] seconds."""
    picks, images = [], {}
    for s, e in spans:
        first = min(round(s * fps), len(frames) - 1)
        last = min(max(round(e * fps), first), len(frames) - 1)
        ks = sorted(set(np.linspace(first, last, min(THUMBS_PER_EVI, last - first + 1)).round().astype(int).tolist()))
        picks.append(ks)
        for k in ks:
            if k not in images:
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(frames[k].permute(1, 2, 0).numpy())).save(
                    buf, "JPEG", quality=THUMB_QUALITY)
                images[k] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return picks, images


def for_page(error, path: Path, name: str) -> str:
    """The one line the page shows for a refused question: the error's message with the server's
    path of the video replaced by the name the user knows it by, and flags named as the page's fields."""
    text = str(error.code if isinstance(error, SystemExit) else error)
    return text.replace(str(path), name).replace("--question", "question")


# ---------------------------------------------------------------------------------------------
# The queue: one worker thread, the questions in the order they came

class Jobs:
    """The questions, answered one at a time, in the order they came, by one worker thread.
    submit() and state() from any HTTP thread; finished questions are kept (the newest KEPT_ANSWERS)
    for their page to read."""

    def __init__(self, answer):
        self.answer, self.queue, self.lock = answer, queue.Queue(), threading.Lock()
        self.jobs, self.count = OrderedDict(), itertools.count(1)  # id -> job, oldest first
        threading.Thread(target=self._work, name="model", daemon=True).start()

    def submit(self, path: Path, name: str, question: str) -> dict:
        with self.lock:
            job = {"id": uuid.uuid4().hex, "n": next(self.count), "state": "queued", "path": path, "name": name,
                   "question": question, "since": time.perf_counter()}
            self.jobs[job["id"]] = job
            self.queue.put(job)
            return {"job": job["id"], "ahead": self._ahead(job)}

    def state(self, job_id: str) -> dict | None:
        """How a question is doing (the module docstring's GET /api/job/ID), None for an unknown id."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job["state"] == "queued":
                return {"state": "queued", "ahead": self._ahead(job)}
            return {k: job[k] for k in ("state", "answer", "message") if k in job}

    def in_use(self) -> set:
        """The video paths that waiting or running questions read."""
        with self.lock:
            return {j["path"] for j in self.jobs.values() if j["state"] in ("queued", "running")}

    def _ahead(self, job) -> int:
        return sum(j["state"] == "running" or (j["state"] == "queued" and j["n"] < job["n"]) for j in self.jobs.values())

    def _work(self):
        while True:
            job = self.queue.get()
            with self.lock:
                job["state"], waited = "running", time.perf_counter() - job["since"]
            try:
                result = {"state": "done", "answer": {**self.answer(job["path"], job["question"]), "queued_s": waited}}
                a = result["answer"]
                print(f"demo: {job['name']}: {a['frames']} frames read in {a['read_s']:.2f} s, {a['tokens']} tokens "
                      f"in {a['generate_s']:.2f} s", file=sys.stderr)
            except (SystemExit, *cli.EXPECTED) as e:  # bad input: one line, as the commands print it
                result = {"state": "error", "message": for_page(e, job["path"], job["name"])}
                print(f"demo: {job['name']}: refused: {result['message']}", file=sys.stderr)
            except Exception as e:  # a bug: the traceback on the console, one line on the page, and serve on
                traceback.print_exc()
                result = {"state": "error", "message": f"internal error ({type(e).__name__}: "
                                                       f"{for_page(e, job['path'], job['name'])}); the server's "
                                                       "console has the traceback"}
            with self.lock:
                job.update(result)
                finished = [k for k, j in self.jobs.items() if j["state"] in ("done", "error")]
                for k in finished[:-KEPT_ANSWERS]:
                    del self.jobs[k]


class Uploads:
    """Uploaded videos in the server's temporary folder, the newest KEPT_UPLOADS kept (one a
    waiting question reads is never removed)."""

    def __init__(self, root: Path, in_use):
        self.root, self.in_use, self.lock, self.files = Path(root), in_use, threading.Lock(), OrderedDict()

    def add(self, name: str, body, length: int) -> str:
        """Store `length` bytes read from `body` (a file object) as an upload named `name`; its id.
        ConnectionError when the client stops sending before the end, OSError when the disk refuses."""
        upload_id, shown = uuid.uuid4().hex, shown_name(name)
        suffix = Path(shown).suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", Path(shown).suffix) else ""
        path = self.root / f"{upload_id}{suffix}"  # FFmpeg guesses some formats by the extension too
        try:
            with open(path, "wb") as f:
                left = length
                while left:
                    chunk = body.read(min(CHUNK, left))
                    if not chunk:
                        raise ConnectionError(f"{shown}: the upload stopped after {length - left} of {length} bytes")
                    f.write(chunk)
                    left -= len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)  # nothing half-written stays
            raise
        with self.lock:
            self.files[upload_id] = (path, shown)
            busy = self.in_use()
            for old in [k for k, (p, _) in self.files.items() if p not in busy][:-KEPT_UPLOADS]:
                self.files.pop(old)[0].unlink(missing_ok=True)
        return upload_id

    def get(self, upload_id) -> tuple | None:
        """(path, name) of an upload, None when it is not kept."""
        with self.lock:
            return self.files.get(upload_id)


def printable(text) -> str:
    """Text a user sent, as a message quotes it: printable characters, at most MAX_NAME_CHARS."""
    return "".join(c for c in str(text) if c.isprintable())[:MAX_NAME_CHARS]


def shown_name(name) -> str:
    """An uploaded file's name as the page shows it: its last part, printable."""
    return printable(Path(str(name).replace("\\", "/")).name) or "upload"


def synthetic_videos(test_json) -> tuple:
    """({name: path} of the synthetic test videos on disk, {name: {task: question}}: each video's
    question of each task, the page's examples)."""
    videos_dir = Path(test_json).parent / "videos"
    paths, examples = {}, {}
    for r in data.load_records(test_json):
        path = videos_dir / r["video"]
        if path.is_file():
            paths[r["video"]] = path
            examples.setdefault(r["video"], {}).setdefault(r["task"], r["q"])
    return paths, examples


# ---------------------------------------------------------------------------------------------
# HTTP

class Refused(Exception):
    """A request answered with one line: HTTP status and message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    """The routes of the module docstring; self.server is a Server."""
    server_version = "d2vlm-demo"
    timeout = IDLE_S

    def do_GET(self):
        url = urlsplit(self.path)
        try:
            if url.path == "/":
                self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
            elif url.path.startswith("/videos/"):
                self._video(unquote(url.path[len("/videos/"):]))
            elif url.path.startswith("/api/job/"):
                state = self.server.jobs.state(url.path[len("/api/job/"):])
                if state is None:
                    raise Refused(HTTPStatus.NOT_FOUND, "no such question (the server keeps the newest "
                                                        f"{KEPT_ANSWERS} answers, and none from before it started)")
                self._json(HTTPStatus.OK, state)
            else:
                raise Refused(HTTPStatus.NOT_FOUND, f"{url.path}: no such page")
        except Refused as e:
            self._json(e.status, {"error": str(e)})

    def do_POST(self):
        url = urlsplit(self.path)
        try:
            if self.headers.get(DEMO_HEADER) != "1":
                raise Refused(HTTPStatus.FORBIDDEN, f"a POST needs the page's {DEMO_HEADER} header (other sites' "
                                                    "pages cannot send it)")
            if url.path == "/api/upload":
                name = parse_qs(url.query).get("name", ["upload"])[0]
                length = self._length(MAX_UPLOAD_BYTES, f"{shown_name(name)}: a video file")
                try:
                    upload_id = self.server.uploads.add(name, self.rfile, length)
                except (ConnectionError, TimeoutError):
                    raise  # the page went away: nobody to answer
                except OSError as e:  # a full disk, say
                    raise Refused(HTTPStatus.INSUFFICIENT_STORAGE, f"{shown_name(name)}: the server could not store "
                                                                   f"it ({e.strerror or e})") from None
                self._json(HTTPStatus.OK, {"upload": upload_id})
            elif url.path == "/api/ask":
                self._json(HTTPStatus.OK, self._ask(self._length(MAX_REQUEST_BYTES, "question: the request")))
            else:
                raise Refused(HTTPStatus.NOT_FOUND, f"{url.path}: no such route")
        except Refused as e:
            self._json(e.status, {"error": str(e)})

    def _ask(self, length: int) -> dict:
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(HTTPStatus.BAD_REQUEST, f"the request is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, "the request is not a JSON object")
        question, video = body.get("question"), body.get("video")
        if isinstance(question, str) and not question.strip():
            raise Refused(HTTPStatus.BAD_REQUEST, "question: empty; ask when something happens in the video "
                                                  "(or pick an example)")
        try:
            data.check_text(question, "question")
        except data.BadRecord as e:
            raise Refused(HTTPStatus.BAD_REQUEST, f"question: {e.reason}") from None
        if isinstance(video, dict) and isinstance(video.get("synthetic"), str):
            path, name = self._synthetic(video["synthetic"]), video["synthetic"]
        elif isinstance(video, dict) and isinstance(video.get("upload"), str):
            kept = self.server.uploads.get(video["upload"])
            if kept is None:
                raise Refused(HTTPStatus.GONE, f"that upload is not kept any more (the server keeps the newest "
                                               f"{KEPT_UPLOADS}): drop the file in again")
            path, name = kept
        else:
            raise Refused(HTTPStatus.BAD_REQUEST, 'video: expected {"upload": id} or {"synthetic": name}, got '
                                                  f"{printable(json.dumps(video))}")
        return self.server.jobs.submit(path, name, question)

    def _synthetic(self, name: str) -> Path:
        """The path of a synthetic test video by its name; a name that is not one of them, or that
        resolves outside their folder, is refused."""
        path = self.server.videos.get(name)
        if path is None or not path.resolve().is_relative_to(self.server.videos_dir):
            raise Refused(HTTPStatus.NOT_FOUND, f"{printable(name)}: not one of the synthetic test videos")
        return path

    def _video(self, name: str):
        """A synthetic test video, whole or the byte range the player asks for."""
        path = self._synthetic(name)
        size = path.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        asked = RANGE.fullmatch(self.headers.get("Range", "").strip())
        if asked and (asked[1] or asked[2]):
            if asked[1]:
                start, end = int(asked[1]), min(int(asked[2]), size - 1) if asked[2] else size - 1
            else:  # the last N bytes
                start = max(size - int(asked[2]), 0)
            if start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left:
                chunk = f.read(min(CHUNK, left))
                self.wfile.write(chunk)
                left -= len(chunk)

    def _length(self, limit: int, what: str) -> int:
        """The request body's length, at most `limit`; a larger one is refused unread (and the connection closed)."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, f"{what} without its length (Content-Length)") from None
        if length > limit:
            self.close_connection = True
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{what} of {length:,} bytes, more than the "
                                                               f"{limit:,} this page takes")
        return length

    def _json(self, status: HTTPStatus, obj):
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        """Quiet: the worker prints one line per question instead of one per request."""


class Server(ThreadingHTTPServer):
    """The HTTP server with what its handlers read: the page, the synthetic videos, the uploads, the queue."""
    daemon_threads = True

    def __init__(self, address, page: bytes, videos: dict, jobs: Jobs, uploads: Uploads):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.page, self.videos, self.jobs, self.uploads = page, videos, jobs, uploads
        self.videos_dir = next(iter(videos.values())).parent.resolve() if videos else None

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a player or page that went away
            return
        super().handle_error(request, client_address)


def exposed(host: str) -> bool:
    """Whether listening on `host` lets other machines in (anything but a loopback address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to
        return True


# ---------------------------------------------------------------------------------------------
# The command

def get_args(argv=None):
    ap = cli.ArgumentParser(description="D2VLM demo: a local page that answers when something happens in a video, "
                                        "its evidence drawn on the video's timeline (docs/demo.md).")
    ap.add_argument("--ckpt", help="checkpoint directory, run folder or released directory (default: the newest of "
                                   "runs/default/fpo, else sft)")
    evaluate.add_model_flags(ap)
    ap.add_argument("--max-new-tokens", type=cli.at_least(1),
                    help=f"default: greedy decoding's, {evaluate.DEFAULT_DECODING['max_new_tokens']}")
    ap.add_argument("--synthetic", default=str(event_videos.SYNTHETIC),
                    help="the synthetic set whose test videos the page offers (generated on first use)")
    ap.add_argument("--host", default=DEFAULT_HOST, help="the address to listen on; anything but a loopback one lets "
                                                         "anyone on that network use the page")
    ap.add_argument("--port", type=cli.between(0, MAX_PORT), default=DEFAULT_PORT, help="0: a free one (printed)")
    return ap.parse_args(argv)


def find_checkpoint(args) -> Path:
    """--ckpt, else the newest intact checkpoint of runs/default; SystemExit naming the command that
    makes one when there is none."""
    if not args.ckpt and not any(checkpoint.checkpoints(checkpoint.DEFAULT_RUN / stage) for stage in ("fpo", "sft")):
        raise SystemExit(NO_CHECKPOINT)
    return evaluate.checkpoint_to_use(args, "demo")


def page(config: dict) -> bytes:
    """PAGE (demo.html) with `config` (what its script reads) inside."""
    text = json.dumps(config).replace("</", "<\\/")  # nothing in it can close the script element
    return PAGE.read_text(encoding="utf-8").replace("__CONFIG__", text).encode("utf-8")


def main(argv=None):
    args = get_args(argv)
    ckpt = find_checkpoint(args)
    _, test = event_videos.ensure_synthetic(args.synthetic)
    videos, examples = synthetic_videos(test)
    print(f"demo: loading {ckpt} ...", file=sys.stderr)
    answerer = Answerer(ckpt, args)
    config = {"checkpoint": str(ckpt), "device": answerer.device, "videos": sorted(videos), "examples": examples,
              "tasks": TASK_NAMES, "evi": EVI, "evi_end": EVI_END, "poll_ms": POLL_MS, "header": DEMO_HEADER,
              "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "request_bytes": MAX_REQUEST_BYTES}}
    with tempfile.TemporaryDirectory(prefix="d2vlm-demo-") as tmp:
        jobs = Jobs(answerer)
        try:
            server = Server((args.host, args.port), page(config), videos, jobs, Uploads(tmp, jobs.in_use))
        except OSError as e:
            raise SystemExit(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}); "
                             "--port 0 picks a free port") from None
        host, port = server.server_address[:2]
        signal.signal(signal.SIGTERM, stop)
        print(f"serving on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
        if exposed(args.host):
            print(f"demo: warning: --host {args.host} listens beyond this machine: anyone on that network can use "
                  "the page (upload videos, run the model); there is no login", file=sys.stderr)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("demo: stopped", file=sys.stderr)
        finally:
            server.server_close()


def stop(signum, frame):
    """SIGTERM stops the server as Ctrl-C does: the temporary folder is removed on the way out."""
    raise KeyboardInterrupt
if __name__ == "__main__":
    cli.run(main)
