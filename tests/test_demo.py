"""demo.py: the page in a real browser (headless Chromium from the system's packages, driven by
selenium from requirements-demo.txt, both installed by .ci/run; nothing is downloaded at run time),
and what the server answers to bad input. The server runs as a user starts it, `python demo.py`,
on a tiny random checkpoint tilted so that it emits <evi> with spans shorter than the video."""
import argparse
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import config
import demo
import evaluate
import model
import video
from evidence import EVI

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium and chromium-driver
MAX_NEW = 8         # new tokens per answer: enough for a few <evi> of the tiny model
START_S = 120       # seconds the server may take to start (imports and the model, on busy cores)
ANSWER_S = 60       # seconds an answer may take, a queue included
POLL_S = 0.05       # how often the test looks at the page while waiting
SHARPEN = 15        # the grounding heads' last layers scaled: a random model's similarity then varies over
                    # the frames, so that its spans are not the whole video
EVI_TILT = 1.1      # the LM head's <evi> row: its first answer token's, scaled, so <evi> gets emitted
SLOW_FRAMES = 300   # a valid video this long keeps the tiny model busy for about a second: a queue forms
SCREENSHOT_ENV = "D2VLM_DEMO_SCREENSHOT"  # a path: the docs' screenshot is made there (test_docs_screenshot)
CKPT_ENV = "D2VLM_DEMO_CKPT"              # its checkpoint (default: runs/default's newest, else the test's)
WIDTH, HEIGHT = 1360, 1000                # the browser's window
REFLOWS = 5                               # tries at sizing the window to the page for a screenshot


# ---------------------------------------------------------------------------------------------
# Fixtures: the checkpoint, the server, the browser

@pytest.fixture(scope="module")
def tiny(synthetic, tmp_path_factory):
    """(a tiny random checkpoint that emits <evi>, the first test video, its tvg question)."""
    clip = synthetic / "videos" / "test_0000.mp4"
    question = next(r["q"] for r in json.loads((synthetic / "test.json").read_text())
                    if r["video"] == clip.name and r["task"] == "tvg")
    torch.manual_seed(0)
    m = model.build_model(config.PRESETS["tiny"]).eval()
    first = evaluate.answer_video(m, evaluate.video_question(clip, question, m.cfg, m.tokenizer, 1), 1)["tokens"][0]
    with torch.no_grad():
        m.lm_head.weight[m.token_id[EVI]] = EVI_TILT * m.lm_head.weight[first]
        m.frm_head[-1].weight *= SHARPEN
        m.evi_head[-1].weight *= SHARPEN
    ckpt = tmp_path_factory.mktemp("demo") / "ckpt"
    ckpt.mkdir()
    checkpoint.save_weights(m, ckpt, full=True)
    return ckpt, clip, question


def expected(ckpt, clip, question, max_new=MAX_NEW) -> dict:
    """What decoding.generate answers (through evaluate.answer_video, as the server calls it) about
    `clip`, in this process."""
    flags = argparse.Namespace(vision_weights=None, llm_weights=None, qformer_tokenizer=None)
    tokenizer = checkpoint.tokenizer_of(ckpt)
    m = evaluate.load_model(ckpt, flags, checkpoint.read_config(ckpt), tokenizer)
    return evaluate.answer_video(m, evaluate.video_question(clip, question, m.cfg, tokenizer, max_new), max_new)


@contextmanager
def serve(ckpt, synthetic, log: Path, *flags):
    """`python demo.py --ckpt CKPT --port 0 ...` running; yields its URL (read from its first line).
    Stopped with SIGTERM at the end, which it must take as Ctrl-C."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--ckpt", str(ckpt), "--synthetic",
                                 str(synthetic), "--port", "0", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], START_S)
            line = proc.stdout.readline() if ready else ""
            assert line.startswith("serving on http://127.0.0.1:"), f"{line!r}; stderr: {log.read_text()}"
            yield line.split()[-1]
            assert proc.poll() is None, f"the server stopped: {log.read_text()}"
        finally:
            proc.terminate()
            rc = proc.wait(timeout=START_S)
    assert rc == 0 and "demo: stopped" in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def server(tiny, synthetic, tmp_path_factory):
    log = tmp_path_factory.mktemp("demo-server") / "stderr.txt"
    with serve(tiny[0], synthetic, log, "--max-new-tokens", str(MAX_NEW)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -r requirements-demo.txt")
    for exe, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(exe).is_file():
            pytest.skip(f"{exe} not found: apt-get install {package} (.ci/run installs it)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}",
                "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))  # no download
    yield driver
    driver.quit()


# ---------------------------------------------------------------------------------------------
# Helpers: HTTP as the page speaks it, the page as a user drives it

def call(url, path, body=None) -> tuple:
    """(HTTP status, JSON) of a GET, or a POST of `body` (bytes) with the page's header."""
    req = urllib.request.Request(url + path, data=body, headers={demo.DEMO_HEADER: "1"})
    try:
        with urllib.request.urlopen(req, timeout=ANSWER_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def upload(url, path: Path) -> str:
    return call(url, f"/api/upload?name={path.name}", path.read_bytes())[1]["upload"]


def ask(url, video_ref: dict, question: str) -> tuple:
    return call(url, "/api/ask", json.dumps({"video": video_ref, "question": question}).encode())


def answered(url, job: str) -> dict:
    """The final state of a question: {"state": "done", "answer"} or {"state": "error", "message"}."""
    deadline = time.monotonic() + ANSWER_S
    while time.monotonic() < deadline:
        state = call(url, f"/api/job/{job}")[1]
        if state["state"] in ("done", "error"):
            return state
        time.sleep(POLL_S)
    raise AssertionError(f"no answer in {ANSWER_S} s")


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, ANSWER_S, poll_frequency=POLL_S).until(condition, f"waiting for {what}")


def ask_on_page(driver, question: str) -> str:
    """Type the question, press Ask, wait for the outcome; the status element's state, done or error."""
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()
    return wait(driver, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error") and
                d.find_element(By.ID, "status").get_attribute("data-state"), "the answer")


def slow_video(tmp_path) -> Path:
    """A valid video of SLOW_FRAMES seconds (one frame a second, small frames)."""
    path = tmp_path / "slow.mp4"
    video.write_video(path, (np.full((64, 64, 3), 3 * k % 255, np.uint8) for k in range(SLOW_FRAMES)), 1)
    return path


def full_page_screenshot(driver, path):
    """The whole page, not only the window: the window made as tall as the page (again while the
    page reflows to it: the scroll bar goes, the video's box grows)."""
    height = 0
    for _ in range(REFLOWS):
        if driver.execute_script("return document.documentElement.scrollHeight") == height:
            break
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height,
                                                                       "deviceScaleFactor": 1, "mobile": False})
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# ---------------------------------------------------------------------------------------------
# The tests

def test_the_page_answers_as_generate_does_and_seeks_the_player(server, browser, tiny, synthetic, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    ckpt, clip, question = tiny
    want = expected(ckpt, clip, question)
    assert len(want["spans"]) >= 2, "the tilted model should emit several <evi>: the test would not cover lanes"
    assert any(e - s < 20 for s, e in want["spans"]), "spans as long as the video: the test would not cover placing"
    d = browser
    d.get(server)
    assert [b.get_attribute("data-task") for b in d.find_elements(By.CSS_SELECTOR, "#examples button")] \
        == list(demo.TASK_NAMES), "an example question per task"
    d.find_element(By.ID, "file").send_keys(str(clip))  # the user drops in a synthetic video
    wait(d, lambda d: d.execute_script("return document.getElementById('player').readyState") >= 1, "the video")
    assert ask_on_page(d, question) == "done", d.find_element(By.ID, "status").text
    segments = d.find_elements(By.CSS_SELECTOR, "#timeline .segment")
    got = [[float(s.get_attribute("data-start")), float(s.get_attribute("data-end"))] for s in segments]
    assert len(got) == len(want["spans"])
    np.testing.assert_allclose(got, want["spans"], rtol=0, atol=1e-6)
    assert d.find_element(By.ID, "answer-text").text in want["text"]
    assert len(d.find_elements(By.CSS_SELECTOR, "#evidence .evi svg polyline")) == len(want["probs"])
    assert d.find_elements(By.CSS_SELECTOR, "#evidence .thumbs img")
    assert "read the video" in d.find_element(By.ID, "timings").text
    for seg, (start, _) in list(zip(segments, want["spans"]))[::-1]:  # a click seeks the player to the span's start
        seg.click()
        assert d.execute_script("return document.getElementById('player').currentTime") == pytest.approx(start)
    full_page_screenshot(d, tmp_path / "demo.png")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a file that is not a video: one line naming it (not the server's copy), and the server goes on
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    d.find_element(By.ID, "file").send_keys(str(notes))
    assert ask_on_page(d, question) == "error"
    message = d.find_element(By.ID, "status").text
    assert message.startswith("notes.txt: cannot open as a video") and "\n" not in message
    assert "d2vlm-demo" not in message and str(tmp_path) not in message

    # a second user's question first: this one is queued, and the page says so; both are answered
    slow = upload(server, slow_video(tmp_path))
    others = [ask(server, {"upload": slow}, question)[1]["job"] for _ in range(2)]
    Select(d.find_element(By.ID, "pick")).select_by_value("test_0001.mp4")
    d.find_element(By.ID, "ask").click()
    wait(d, lambda d: d.find_element(By.ID, "status").text.startswith("queued: "), "the queued message")
    assert wait(d, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error") and
                d.find_element(By.ID, "status").get_attribute("data-state"), "the answer") == "done"
    other = expected(ckpt, synthetic / "videos" / "test_0001.mp4", question)
    got = [[float(s.get_attribute("data-start")), float(s.get_attribute("data-end"))]
           for s in d.find_elements(By.CSS_SELECTOR, "#timeline .segment")]
    np.testing.assert_allclose(np.reshape(got, (-1, 2)), np.reshape(other["spans"], (-1, 2)), rtol=0, atol=1e-6)
    assert all(answered(server, job)["state"] == "done" for job in others)


def test_bad_input_gets_one_line_and_the_server_goes_on(server, tiny, tmp_path):
    ckpt, clip, question = tiny
    synthetic = {"synthetic": clip.name}
    assert ask(server, synthetic, "  ") == (400, {"error": "question: empty; ask when something happens in the "
                                                           "video (or pick an example)"})
    status, body = ask(server, synthetic, "When? " * 17_000)  # 100 KB
    assert status == 400 and body["error"] == "question: 102,000 characters, more than 65,536: no model context holds it"
    assert ask(server, {"synthetic": "../test.json"}, question) \
        == (404, {"error": "../test.json: not one of the synthetic test videos"})
    assert call(server, "/videos/..%2Ftest.json")[0] == 404
    assert ask(server, {"upload": "0" * 32}, question)[0] == 410
    assert call(server, "/api/ask", b"{}")[1]["error"].startswith("question: missing")
    req = urllib.request.Request(server + "/api/ask", data=b"{}")  # without the page's header: refused
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(req, timeout=ANSWER_S)
    # a video longer than the tiny model's context (max_len 512, one token per frame)
    long = tmp_path / "long.mp4"
    video.write_video(long, (np.zeros((64, 64, 3), np.uint8) for _ in range(config.PRESETS["tiny"].max_len)), 1)
    state = answered(server, ask(server, {"upload": upload(server, long)}, question)[1]["job"])
    assert state["state"] == "error" and state["message"].startswith(f"long.mp4: {config.PRESETS['tiny'].max_len - 1}.0 s "
                                                                     "long, more than this model sees: ")
    assert "cut the video to" in state["message"] and "\n" not in state["message"]
    # two users at once: both answered, in the order they came
    slow = upload(server, slow_video(tmp_path))
    first, second = ask(server, {"upload": slow}, question)[1], ask(server, synthetic, question)[1]
    assert second["ahead"] >= 1
    a, b = answered(server, first["job"]), answered(server, second["job"])
    assert a["state"] == b["state"] == "done"
    assert b["answer"]["queued_s"] >= a["answer"]["generate_s"]  # it waited for the first
    assert b["answer"]["spans"] == expected(ckpt, clip, question)["spans"]


def test_no_checkpoint_names_the_command_that_makes_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/default here
    with pytest.raises(SystemExit, match=r"no checkpoint under runs/default: make one with `torchrun train\.py "
                                         r"--stage sft` \(then `torchrun train\.py --stage fpo`"):
        demo.main([])


def test_only_loopback_hosts_are_private():
    assert not any(demo.exposed(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert all(demo.exposed(h) for h in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"))


@pytest.mark.skipif(not os.environ.get(SCREENSHOT_ENV), reason=f"{SCREENSHOT_ENV}=PATH makes the docs' screenshot")
def test_docs_screenshot(tiny, synthetic, browser, tmp_path):
    """docs/demo.png: the quickstart's checkpoint ($D2VLM_DEMO_CKPT, else runs/default's newest, else
    the test's) answering the tvg question of the first synthetic test video."""
    from selenium.webdriver.common.by import By
    default = ROOT / checkpoint.DEFAULT_RUN
    ckpt = os.environ.get(CKPT_ENV) or (checkpoint.latest_checkpoint(default)[0]
                                        if any(checkpoint.checkpoints(default / s) for s in ("fpo", "sft")) else tiny[0])
    with serve(ckpt, synthetic, tmp_path / "stderr.txt") as url:
        browser.get(url)
        browser.find_element(By.ID, "file").send_keys(str(tiny[1]))
        wait(browser, lambda d: d.execute_script("return document.getElementById('player').readyState") >= 1, "the video")
        assert ask_on_page(browser, tiny[2]) == "done"
        browser.find_elements(By.CSS_SELECTOR, "#timeline .segment")[0].click()
        wait(browser, lambda d: d.execute_script("return document.getElementById('player').seeking") is False, "the seek")
        full_page_screenshot(browser, os.environ[SCREENSHOT_ENV])
