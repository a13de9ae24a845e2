// The drawing area: a person draws a digit with a mouse, a finger or a pen (pointer events;
// the canvas has `touch-action: none`, so a finger draws instead of scrolling). White strokes
// on opaque black, as the bundled models were trained (MNIST and scikit-learn's digits are
// light digits on a dark background). Certify sends it as a PNG in the `image` field, exactly
// like an uploaded file: the service resizes it to the model's input (28x28 for MNIST). An
// opaque canvas matters: the service composites transparency onto white.

export const DRAW_SIZE = 280; // canvas pixels, 10x MNIST's 28
const STROKE = 22; // pen width in canvas pixels: about 2 px at 28x28, as in MNIST
const INK = "#fff";
const PAPER = "#000";

let canvas = null;
let ctx = null;
let drawn = false; // at least one stroke since the last clear
let last = null; // the active pointer's id and position
let changed = () => {};

/** Set up the canvas `canvasId` and its Clear button `clearId`; `onChange(drawn)` is called
 * when a stroke starts (true) and when the drawing is cleared (false). */
export function initDraw(canvasId, clearId, onChange) {
  canvas = document.getElementById(canvasId);
  ctx = canvas.getContext("2d");
  changed = onChange;
  canvas.width = canvas.height = DRAW_SIZE;
  paper();
  canvas.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    canvas.addEventListener(type, up);
  }
  document.getElementById(clearId).addEventListener("click", () => clearDrawing());
}

/** Whether a digit is drawn (Certify then sends it when no file is chosen). */
export function hasDrawing() {
  return drawn;
}

/** Wipe the canvas to black; `notify`: tell the page (not when it clears it itself). */
export function clearDrawing({ notify = true } = {}) {
  if (!ctx) return;
  paper();
  drawn = false;
  last = null;
  if (notify) changed(false);
}

/** The drawing as a PNG Blob (DRAW_SIZE x DRAW_SIZE, opaque). */
export function drawingPng() {
  return new Promise((resolve, reject) => {
    canvas.toBlob(
      (blob) => (blob ? resolve(blob) : reject(new Error("could not save the drawing as PNG"))),
      "image/png",
    );
  });
}

function paper() {
  ctx.fillStyle = PAPER;
  ctx.fillRect(0, 0, DRAW_SIZE, DRAW_SIZE);
}

/** A pointer event's position in canvas pixels (the canvas is scaled by CSS). */
function at(event) {
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * DRAW_SIZE) / box.width,
    y: ((event.clientY - box.top) * DRAW_SIZE) / box.height,
  };
}

function down(event) {
  if (event.button !== 0 || last) return; // the primary button; one pointer at a time
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  const p = at(event);
  last = { id: event.pointerId, ...p };
  ctx.fillStyle = INK;
  ctx.beginPath();
  ctx.arc(p.x, p.y, STROKE / 2, 0, 2 * Math.PI); // a dot, if the pointer does not move
  ctx.fill();
  if (!drawn) {
    drawn = true;
    changed(true);
  }
}

function move(event) {
  if (!last || event.pointerId !== last.id) return;
  event.preventDefault();
  const points = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  ctx.strokeStyle = INK;
  ctx.lineWidth = STROKE;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  for (const e of points.length ? points : [event]) {
    const p = at(e);
    ctx.lineTo(p.x, p.y);
    last.x = p.x;
    last.y = p.y;
  }
  ctx.stroke();
}

function up(event) {
  if (last && event.pointerId === last.id) last = null;
}
