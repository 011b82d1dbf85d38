"""The web page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, on the tiny
model and the demo photos. One run through the whole page, as a user would: upload (a HEIC photo among
them), check every photo with its mask and warnings, exclude one, paint a mask, prepare again (the mask
stays), delete a photo, pick the model and a preset, train (the progress bar with a speed, a chart and a
sample), queue a second run, stop, resume, reload and find the run in the list with its config, Start on
the finished run asks, a refused resume shows its reason in the list, generate, evaluate, download the LoRA. Saves docs/images/app_{photos,train,results}.png."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)", allow_module_level=True)

TRAIN_EDITS = {  # the demo preset made small enough for a CPU test
    r"resolution = \d+": "resolution = 64",
    r"batch_size = \d+": "batch_size = 2",
    r"every = \d+": "every = 2",
    r"save_every = \d+": "save_every = 1",
    r"steps = 10\b": "steps = 2",  # sample.steps
    r"\bn = \d+": "n = 1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    base = tmp_path_factory.mktemp("app")
    data, out = base / "data", base / "out"
    data.mkdir()
    env_py = sys.executable
    subprocess.run([env_py, "-m", "testkit.tiny", str(data / "tiny_sd"), "--arcface",
                    str(data / "arcface_random.pth")], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([env_py, "-m", "dataset_tools.demo_photos", str(data / "demo_raw")], cwd=ROOT, check=True,
                   capture_output=True)
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    first = sorted((data / "demo_raw" / "source").iterdir())[0]
    Image.open(first).convert("RGB").save(data / "iphone.heic", quality=90)  # an iPhone photo's format
    port = _free_port()
    log = open(base / "app.log", "wb")
    proc = subprocess.Popen([env_py, "app.py", "--port", str(port), "--data-dir", str(data), "--output-dir", str(out)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"app.py did not come up: {(base / 'app.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, data, out
    proc.terminate()
    proc.wait(10)
    log.close()
    for lock in out.glob("*/app_run.lock"):  # a training run left behind by a failed test
        subprocess.run(["kill", str(json.loads(lock.read_text())["pid"])], check=False)


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} :is(textarea, input)").first.input_value()


def _wait_value(page, elem_id: str, pattern: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = _value(page, elem_id)
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"#{elem_id} never matched {pattern!r}; it shows {text!r}")


def _fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} :is(textarea, input)").first
    box.fill(text)
    box.press("Tab")


def _shot(page, name: str, top_of: str | None = None) -> None:
    """Save docs/images/NAME: the page 1000 px wide, at most 1100 px tall from the element `top_of`
    (default the top), 128 colours, optimised."""
    from PIL import Image

    IMAGES.mkdir(parents=True, exist_ok=True)
    png = page.screenshot(full_page=True)
    im = Image.open(io.BytesIO(png)).convert("RGB")
    top = 0
    if top_of:
        box = page.locator(top_of).first.bounding_box()
        top = max(0, int(box["y"] + page.evaluate("window.scrollY")) - 40)
    im = im.crop((0, top, im.width, min(im.height, top + 1100)))
    im.quantize(colors=128).save(IMAGES / name, optimize=True)


def test_the_whole_page(app):
    url, data, out = app
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)

        # -------------------------------------------------------------- photos
        raw = data / "demo_raw"
        page.locator("#src_files input[type=file]").set_input_files(
            [str(p) for p in sorted((raw / "source").iterdir())] + [str(data / "iphone.heic")])
        page.locator("#ref_files input[type=file]").set_input_files([str(p) for p in sorted((raw / "reference").iterdir())])
        time.sleep(2)  # the uploads land on the server
        page.click("#prepare")
        status = _wait_value(page, "photo_status", r"prepare reference|error", 240)
        assert "error" not in status, status
        prepared = data / "prepared" / "source"
        assert (prepared / "iphone.json").is_file(), page.locator("#photo_notes").inner_text()  # HEIC accepted
        stems = sorted(p.stem for p in prepared.glob("*.json") if p.name not in ("app_prepare.json", "iphone.json"))
        stems.append("iphone")  # the HEIC photo, last (deleted below)
        records = {s: json.loads((prepared / f"{s}.json").read_text()) for s in stems}
        assert len(stems) >= 3
        gallery = page.locator("#src_gallery")
        assert gallery.locator("img").count() == len(stems)
        text, notes = gallery.inner_text(), page.locator("#photo_notes").inner_text()
        for s, rec in records.items():  # every photo, and every warning prepare wrote for it
            assert s in text and s in notes
            for w in rec["warnings"]:
                assert w in notes

        # exclude the first photo: its files leave the folder the trainer reads
        gallery.locator("img").first.click()
        _wait_value(page, "item_info", "^" + re.escape(stems[0]), 30)
        page.click("#exclude")
        _wait_value(page, "photo_status", "excluded from training", 30)
        assert (prepared / "excluded" / f"{stems[0]}.json").is_file() and not (prepared / f"{stems[0]}.json").exists()
        assert f"{stems[0]} (excluded)" in page.locator("#photo_notes").inner_text()

        # paint on the next photo's mask with the white brush and save it
        gallery.locator("img").first.click()  # excluded photos are listed last
        _wait_value(page, "item_info", stems[1], 30)
        before = (prepared / f"{stems[1]}.mask.png").read_bytes()
        editor = page.locator("#mask_editor")
        editor.scroll_into_view_if_needed()
        for attempt in range(3):  # the editor draws the new photo a moment after the selection shows
            time.sleep(2)
            editor.get_by_role("button", name="Brush", exact=True).first.click()  # the first colour: white
            box = editor.locator("canvas").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
            page.mouse.down()
            for k in range(1, 15):
                page.mouse.move(box["x"] + box["width"] * (0.2 + 0.04 * k),
                                box["y"] + box["height"] * (0.3 + 0.02 * k), steps=3)
            page.mouse.up()
            page.click("#save_mask")
            time.sleep(3)  # the answer replaces the status; a failed attempt's line may still show until then
            if "mask saved" in _wait_value(page, "photo_status", "mask saved|paint on the photo first", 30):
                break
        _wait_value(page, "photo_status", "mask saved", 1)
        assert (prepared / f"{stems[1]}.mask.png").read_bytes() != before
        assert (prepared / "original_masks" / f"{stems[1]}.mask.png").read_bytes() == before
        # prepare again (as after adding a photo): the painted mask is the user's and stays
        painted = (prepared / f"{stems[1]}.mask.png").read_bytes()
        page.click("#prepare")
        _wait_value(page, "photo_status", r"(?s)^(?!.*mask saved).*(prepare reference|error)", 240)
        assert (prepared / f"{stems[1]}.mask.png").read_bytes() == painted
        assert f"{stems[1]} (trains, mask edited)" in page.locator("#photo_notes").inner_text()

        # delete the HEIC photo: listed first (included photos come first, in name order)
        n_before = gallery.locator("img").count()
        gallery.locator("img").nth(sorted(stems[1:]).index("iphone")).click()
        _wait_value(page, "item_info", "^iphone", 30)
        page.click("#delete_photo")
        _wait_value(page, "photo_status", "iphone: deleted", 30)
        assert not (prepared / "iphone.json").exists() and not (data / "photos" / "source" / "iphone.heic").exists()
        stems.remove("iphone")
        assert gallery.locator("img").count() == n_before - 1
        _shot(page, "app_photos.png", "#src_gallery")
        page.reload()  # nothing lives only in the browser: the galleries come back from the folders
        gallery = page.locator("#src_gallery")
        deadline = time.time() + 60
        while gallery.locator("img").count() != len(stems) and time.time() < deadline:
            time.sleep(0.5)
        assert gallery.locator("img").count() == len(stems)
        assert "(EXCLUDED)" in gallery.inner_text() and "mask edited" in gallery.inner_text()

        # -------------------------------------------------------------- train
        page.get_by_role("tab", name="Train").click()
        page.locator("#model_pick input").click()  # the picker lists the data folder's model with its family
        page.get_by_role("option", name=re.compile(r"tiny_sd: an SD 1\.x")).click()
        _wait_value(page, "family", "SD 1.x", 60)
        assert _value(page, "model") == str(data / "tiny_sd")
        page.locator("#preset input").click()
        page.get_by_role("option", name="demo (tiny model, CPU)").click()
        _wait_value(page, "steps1", "^40$", 30)  # the preset sets the steps and the resolution
        assert _value(page, "resolution") == "256"
        _fill(page, "output_name", "t1")
        _fill(page, "steps1", "2")
        # enough phase-2 steps that Stop lands while the run is still going, however fast this machine is
        _fill(page, "steps2", "24")
        _fill(page, "id_weights", str(data / "arcface_random.pth"))
        page.click("#compose")
        toml = _wait_value(page, "toml", r"steps = 24\b", 30)
        for pattern, repl in TRAIN_EDITS.items():
            toml = re.sub(pattern, repl, toml)
        _fill(page, "toml", toml)
        page.click("#start")
        _wait_value(page, "train_status", r"started training|error", 30)
        assert "started" in _value(page, "train_status")
        page.click("#start")  # a second start on the same output folder is refused
        _wait_value(page, "train_status", "already", 30)
        _wait_value(page, "progress", r"running: phase \d step [1-9]", 300)
        page.locator("#progress_bar", has_text=re.compile(r"phase \d: \d+/\d+ steps, [0-9.]+ steps/s")).wait_for()
        page.locator("#loss_plot canvas, #loss_plot svg").first.wait_for(timeout=30_000)
        # a second run while t1 trains waits in the queue (and Stop takes it out)
        _fill(page, "output_name", "t2")
        page.click("#start")
        _wait_value(page, "train_status", "t2 is queued: it starts when t1 ends", 30)
        page.locator("#runs", has_text="queued: waits for t1 to end").wait_for()
        page.click("#stop")
        _wait_value(page, "train_status", "t2 taken out of the queue", 30)
        _fill(page, "output_name", "t1")
        page.click("#stop")
        _wait_value(page, "train_status", "asked t1 to stop", 30)
        _wait_value(page, "progress", r"^stopped", 300)
        assert list((out / "t1").glob("checkpoint-*")), "Stop saved no checkpoint"
        page.click("#resume")
        _wait_value(page, "train_status", r"resumed training", 30)
        _wait_value(page, "progress", r"running", 30)
        deadline = time.time() + 600
        while not (out / "t1" / "t1.safetensors").is_file() or (out / "t1" / "app_run.lock").exists():
            assert time.time() < deadline, _value(page, "log_tail")
            time.sleep(2)
        _wait_value(page, "progress", r"finished: phase 2 step 24/24", 30)
        page.locator("#samples img").first.wait_for(timeout=30_000)
        _shot(page, "app_train.png", "#runs")

        # reload: the run is in the list; picking it loads its config back into the form
        page.reload()
        page.get_by_role("tab", name="Train").click()
        _fill(page, "output_name", "")
        page.locator("#run_pick input").click()
        page.get_by_role("option", name="t1", exact=True).click()
        _wait_value(page, "toml", r"steps = 24\b", 30)
        assert _value(page, "output_name") == "t1" and _value(page, "steps2") == "24"
        # Start on the finished run asks before overwriting it
        page.click("#start")
        page.locator("#ask", has_text="t1 already holds a run (finished: phase 2 step 24/24)").wait_for()
        page.click("#ask_cancel")
        _wait_value(page, "train_status", "cancelled: nothing started", 30)
        # a resume the trainer refuses (the resolution changed): the reason is the run's state in the list
        _fill(page, "toml", re.sub(r"resolution = 64", "resolution = 128", _value(page, "toml")))
        page.click("#resume")
        page.locator("#runs", has_text=re.compile(r"failed: .*resolution")).wait_for(timeout=120_000)
        assert _value(page, "progress").startswith("failed: ")

        # -------------------------------------------------------------- results
        page.get_by_role("tab", name="Results").click()
        _wait_value(page, "prompt", "a photo of a mcv1 person in the style of mcv2", 30)
        _fill(page, "gen_steps", "2")
        page.click("#generate")
        status = _wait_value(page, "results_status", r"wrote 1 image|error", 300)
        assert status.startswith("wrote 1 image"), status
        page.locator("#generated img").first.wait_for()
        assert "<lora:t1:0.6>" in page.locator("#usage").inner_text()
        with page.expect_download() as dl:
            page.click("#dl_lora")
        saved = out / "downloaded.safetensors"
        dl.value.save_as(saved)
        assert saved.read_bytes() == (out / "t1" / "t1.safetensors").read_bytes()
        assert [f.name for f in out.glob("t1/t1-step*.safetensors")] == []  # save_lora_every is off in the demo
        page.click("#evaluate")
        status = _wait_value(page, "results_status", r"evaluation written|error", 300)
        assert status == "evaluation written to " + str(out / "t1" / "evaluation"), status
        assert "face found (share of images)" in page.locator("#evaluation").inner_text()
        page.locator("#report iframe").wait_for()
        _shot(page, "app_results.png")
        browser.close()
