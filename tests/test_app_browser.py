"""The web page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, on the tiny
model and the demo photos. One run through the whole page, as a user would: upload (a HEIC photo and a
group photo among them), check every photo with its mask and warnings (a warning read in full beside its
photo), exclude one, paint a mask with a stroke begun beside the photo, prepare again (the mask stays),
delete a photo, pick the model and a preset, train (the progress bar with a speed, a chart and a
sample), queue a second run, stop, resume, reload and find the run in the list with its config, Start on
the finished run asks, a refused resume shows its reason in the list, generate, evaluate (the report
opens in the page; files outside the allowed folders are refused), download the LoRA. Saves
docs/images/app_{photos,train,results}.png."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

    pillow_heif.register_heif_opener()
    first = sorted((data / "demo_raw" / "source").iterdir())[0]
    Image.open(first).convert("RGB").save(data / "iphone.heic", quality=90)  # an iPhone photo's format
    face = Image.open(first).convert("RGB")  # two faces side by side: prepare warns of a group photo
    group = Image.new("RGB", (face.width * 2, face.height))
    group.paste(face, (0, 0))
    group.paste(face.resize((face.width * 3 // 4, face.height * 3 // 4)), (face.width, face.height // 8))
    group.save(data / "group.png")
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


def _click_and_settle(page, selector: str, output: str, timeout: float = 60_000) -> None:
    """Click `selector` and wait until Gradio has answered into the component `output`: its loading
    overlay (the status tracker) was shown and hidden again, seen through the tracker's class changes."""
    page.evaluate("""(id) => {
        const tracker = document.querySelector(`#${id} [data-testid=status-tracker]`);
        window.mcSettled = false;
        let busy = false;
        new MutationObserver((records, observer) => {
            busy = busy || records.some(r => !(r.oldValue || "").split(" ").includes("hide"));
            if (busy && tracker.classList.contains("hide")) { observer.disconnect(); window.mcSettled = true; }
        }).observe(tracker, {attributes: true, attributeFilter: ["class"], attributeOldValue: true});
    }""", output)
    page.click(selector)
    page.wait_for_function("window.mcSettled === true", timeout=timeout)


def _fully_shown(page, selector: str) -> None:
    """Assert that the text box `selector` shows its whole text: what its scroll bar would hide is under
    half a line (Gradio sizes a growing box to its text, borders aside), and the box lies inside the page."""
    hidden, right = page.locator(selector).evaluate("""e => [(e.scrollHeight - e.clientHeight)
        / parseFloat(getComputedStyle(e).lineHeight), e.getBoundingClientRect().right <= window.innerWidth]""")
    assert hidden < 0.5 and right, (selector, hidden, right)


def _fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} :is(textarea, input)").first
    box.fill(text)
    box.press("Tab")


def _shot(page, name: str, top_of: str | None = None) -> None:
    """Save docs/images/NAME: the page 1000 px wide, at most 1100 px tall from the element `top_of`
    (default the top), 128 colours, optimised."""
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
        uploads = {"src_files": [*sorted((raw / "source").iterdir()), data / "group.png", data / "iphone.heic"],
                   "ref_files": sorted((raw / "reference").iterdir())}
        for elem_id, files in uploads.items():
            page.locator(f"#{elem_id} input[type=file]").set_input_files([str(f) for f in files])
        for elem_id, files in uploads.items():  # each file is listed with its server copy once it landed
            playwright.expect(page.locator(f"#{elem_id} tr.file a.download-link")).to_have_count(len(files))
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
        # the group photo's warning: counted at the start of its gallery caption (the part Gradio never
        # cuts), and its whole text beside the photo once it is clicked
        assert [w[:16] for w in records["group"]["warnings"]] == ["2 faces found; u"]
        label = gallery.locator(".caption-label", has_text="group")
        assert label.inner_text().startswith("⚠ 1 group (trains")
        assert label.evaluate("""e => { const r = document.createRange(); r.setStart(e.firstChild, 0);
            r.setEnd(e.firstChild, 3); return r.getBoundingClientRect().right <= e.getBoundingClientRect().right; }""")
        _click_and_settle(page, f"#src_gallery img >> nth={stems.index('group')}", "item_info")
        shown = _value(page, "item_info")
        assert shown.startswith("group (trains)") and f"warning: {records['group']['warnings'][0]}" in shown, shown
        _fully_shown(page, "#item_info textarea")

        # exclude the first photo: its files leave the folder the trainer reads
        gallery.locator("img").first.click()
        _wait_value(page, "item_info", "^" + re.escape(stems[0]), 30)
        page.click("#exclude")
        _wait_value(page, "photo_status", "excluded from training", 30)
        assert (prepared / "excluded" / f"{stems[0]}.json").is_file() and not (prepared / f"{stems[0]}.json").exists()
        assert f"{stems[0]} (excluded)" in page.locator("#photo_notes").inner_text()

        # paint on the next photo's mask with the white brush, in one stroke that starts beside the photo
        # (on the editor's blank canvas) and ends at the canvas's centre (the photo's centre), and save it
        _click_and_settle(page, "#src_gallery img >> nth=0", "mask_editor")  # excluded photos are listed last
        assert _value(page, "item_info").startswith(stems[1])
        before = (prepared / f"{stems[1]}.mask.png").read_bytes()
        old = np.asarray(Image.open(io.BytesIO(before)))
        h, w = old.shape
        assert old[h // 2, 0] == 0  # the photo's left edge at the stroke's height does not train yet
        editor = page.locator("#mask_editor")
        editor.scroll_into_view_if_needed()
        for attempt in range(3):  # the editor may still be drawing the new photo when the selection settled
            editor.get_by_role("button", name="Brush", exact=True).first.click()  # the first colour: white
            box = editor.locator(".pixi-target canvas").bounding_box()
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + 4, y)  # the blank canvas left of the photo (a 30 px border at least)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2, y, steps=25)
            page.mouse.up()
            _click_and_settle(page, "#save_mask", "photo_status")
            if "mask saved" in _value(page, "photo_status"):
                break
        assert "mask saved" in _value(page, "photo_status"), _value(page, "photo_status")
        new = np.asarray(Image.open(prepared / f"{stems[1]}.mask.png"))
        # painted from the photo's left edge to its centre along the middle row; nothing far from the stroke
        assert (new[h // 2, : w // 2 - w // 20] == 255).all()
        assert (new[:, w // 2 + w // 8:] == old[:, w // 2 + w // 8:]).all()
        assert (new[: h // 4] == old[: h // 4]).all() and (new[3 * h // 4:] == old[3 * h // 4:]).all()
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
        assert _value(page, "item_info") == "" and _value(page, "caption") == ""  # no longer shown as selected
        assert not (prepared / "iphone.json").exists() and not (data / "photos" / "source" / "iphone.heic").exists()
        stems.remove("iphone")
        assert gallery.locator("img").count() == n_before - 1
        _shot(page, "app_photos.png", "#src_gallery")
        page.reload()  # nothing lives only in the browser: the galleries come back from the folders
        gallery = page.locator("#src_gallery")
        playwright.expect(gallery.locator("img")).to_have_count(len(stems), timeout=60_000)
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
        # the report opens in the page: its address serves evaluation/report.html, thumbnails and all
        frame = page.locator("#report iframe")
        frame.wait_for()
        report = out / "t1" / "evaluation" / "report.html"
        src = urllib.parse.urljoin(url, frame.get_attribute("src"))
        assert urllib.request.urlopen(src, timeout=30).read() == report.read_bytes()
        shown = page.frame_locator("#report iframe")
        shown.locator("#summary").wait_for()
        counts = [shown.locator(f"#{part} figure img").count() for part in ("generated", "source", "reference")]
        assert counts == [1, len(stems) - 1, len(list((raw / "reference").iterdir()))]  # stems[0] is excluded
        loaded = shown.locator("figure img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
        assert loaded == [True] * sum(counts)
        # the same address for a file outside the data, output and models folders is refused, and so is a
        # link inside the output folder that leads out of it
        (out / "t1" / "evaluation" / "leak.log").symlink_to(out.parent / "app.log")
        for outside in (out.parent / "app.log", out / "t1" / "evaluation" / "leak.log"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.parse.urljoin(url, f"gradio_api/file={outside}"), timeout=30)
            assert refused.value.code == 403, outside
        _shot(page, "app_results.png")
        browser.close()
