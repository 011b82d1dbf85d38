// A brush stroke that starts beside the photo in the mask editor (#mask_editor) paints once it enters it.
// Why: Gradio's ImageEditor (6.x) starts a stroke only on a pointerdown over the image (its brush tool's
// on_pointer_down returns unless is_over_image), so a stroke begun on the blank canvas around the photo
// painted nothing at all. Here a stroke begun there is held, and when the pointer comes over the photo the
// canvas is sent a pointermove and a pointerdown at that point: the editor's own stroke starts there.
// Where the photo lies: the editor centres it in the canvas at the zoom its toolbar shows (rounded to 1 %),
// and the page writes the photo's size into #mask_photo_size; a point 1 % inside the edges is surely on it.
(() => {
  let held = null; // the canvas of a stroke that began beside the photo, while the button is down

  function photoRect(canvas) {
    const size = document.querySelector("#mask_photo_size [data-width]");
    const zoom = document.querySelector("#mask_editor .zoom-number span");
    if (!size || !zoom) return null;
    const s = parseFloat(zoom.textContent) / 100;
    const w = Number(size.dataset.width) * s, h = Number(size.dataset.height) * s;
    if (!(w > 0 && h > 0)) return null;
    const r = canvas.getBoundingClientRect(), cx = r.left + r.width / 2, cy = r.top + r.height / 2;
    const m = 0.01 * Math.max(w, h) + 1;
    return { left: cx - w / 2 + m, right: cx + w / 2 - m, top: cy - h / 2 + m, bottom: cy + h / 2 - m };
  }

  const inside = (rect, e) => rect && e.clientX >= rect.left && e.clientX <= rect.right &&
    e.clientY >= rect.top && e.clientY <= rect.bottom;

  function painting() { // the brush or the eraser is the editor's current tool
    return !!document.querySelector("#mask_editor button.highlight:is([aria-label=Brush], [aria-label=Erase])");
  }

  function send(canvas, type, e) {
    canvas.dispatchEvent(new PointerEvent(type, {
      bubbles: true, cancelable: true, composed: true, clientX: e.clientX, clientY: e.clientY,
      screenX: e.screenX, screenY: e.screenY, pointerId: e.pointerId, pointerType: e.pointerType,
      isPrimary: true, button: type === "pointerdown" ? 0 : -1, buttons: 1,
    }));
  }

  document.addEventListener("pointerdown", (e) => {
    held = null;
    const canvas = e.target instanceof HTMLCanvasElement && e.target.closest("#mask_editor .pixi-target")
      ? e.target : null;
    if (canvas && e.button === 0 && painting() && !inside(photoRect(canvas), e)) held = canvas;
  }, true);

  document.addEventListener("pointermove", (e) => {
    if (!held || !(e.buttons & 1) || !e.isTrusted || !inside(photoRect(held), e)) return;
    const canvas = held;
    held = null;
    send(canvas, "pointermove", e); // the editor notes the pointer is over the photo ...
    send(canvas, "pointerdown", e); // ... and starts the stroke here
  }, true);

  document.addEventListener("pointerup", () => { held = null; }, true);
})();
