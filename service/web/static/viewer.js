// The slice viewer on the series page: every slice of the series version, scrolled with the mouse
// wheel, the arrow keys (Home/End, PageUp/PageDown by 10) or the slider; window presets and free
// level/width; the residual heat map and the liver contour as layers stacked over the slice, each
// toggled on its own; a click on the score plot jumps to that slice.
//
// No build step: a plain ES module. What it needs comes from `viewer.json` (see
// service/web/routes/viewer.py); images are PNG layers the app renders and the browser caches
// (Cache-Control + ETag). The next and previous PREFETCH slices are requested ahead of time.
//
// For tests and people: #viewer gets data-ready="true" once set up and data-loaded="<index>" each
// time the slice layer has loaded.

const PREFETCH = 5;
const PREFETCH_KEEP = 80; // prefetched Image objects kept alive (the browser cache holds the bytes)

const root = document.getElementById("viewer");
if (root) {
  start(root).catch((error) => report(root, `The slice viewer could not start: ${error}`));
}

function report(root, message) {
  const status = root.querySelector("#viewer-status");
  if (status) status.textContent = message;
}

function fill(template, index) {
  return template.replace("{index}", String(index));
}

function formatNumber(value) {
  // 40 → "40", 62.5 → "62.5": what the W/L fields and the image URL show.
  return String(Math.round(value * 10) / 10);
}

async function start(root) {
  const response = await fetch(root.dataset.infoUrl, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) {
    report(root, `The slice viewer is not available (${response.status}).`);
    return;
  }
  const info = await response.json();
  if (!info.num_slices) {
    report(root, "This series version has no slices to show.");
    return;
  }

  const $ = (selector) => root.querySelector(selector);
  const stage = $(".viewer-stage");
  const layers = { slice: $("img.viewer-slice"), residual: $("img.viewer-residual"), contour: $("img.viewer-contour") };
  const slider = $("#viewer-slider");
  const indexOut = $("#viewer-index");
  const levelIn = $("#viewer-wl");
  const widthIn = $("#viewer-ww");
  const toggles = { residual: $("#viewer-overlay-residual"), contour: $("#viewer-overlay-contour") };
  const last = info.num_slices - 1;
  const prefetched = new Map();

  // Open on the highest-scoring slice when the series was scored, else on the first.
  let opening = 0;
  info.slices.forEach((s, i) => {
    if (s.score !== null && (info.slices[opening].score === null || s.score > info.slices[opening].score)) opening = i;
  });
  const state = {
    index: opening,
    level: info.window.level,
    width: info.window.width,
    overlays: { residual: false, contour: false },
  };

  const sliceUrl = (index) =>
    `${fill(info.urls.slice, index)}?wl=${formatNumber(state.level)}&ww=${formatNumber(state.width)}`;
  const layerWanted = (name, index) => state.overlays[name] && info.slices[index][name];

  // --- controls built from viewer.json ---
  $("#viewer-count").textContent = String(info.num_slices);
  slider.max = String(last);
  const presets = $(".viewer-presets");
  for (const [name, window] of Object.entries(info.presets)) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.preset = name;
    button.textContent = name;
    button.title = `W ${window.width} / L ${window.level}`;
    button.addEventListener("click", () => setWindow(window.level, window.width));
    presets.append(button);
  }
  const unavailable = {
    residual: info.residual_slices.length ? null : "no residual maps for this series",
    contour: info.contour.available ? null : info.contour.reason || "no contour for this series",
  };
  for (const [name, toggle] of Object.entries(toggles)) {
    const label = root.querySelector(`label[for=${toggle.id}]`);
    if (unavailable[name]) {
      toggle.disabled = true;
      label.title = unavailable[name];
      label.classList.add("disabled");
    } else if (name === "residual") {
      label.title = `heat map on the highest-scoring slices: ${info.residual_slices.join(", ")}`;
    }
    toggle.addEventListener("change", () => {
      state.overlays[name] = toggle.checked;
      show();
    });
  }

  // --- drawing ---
  function setLayer(name, index) {
    const img = layers[name];
    if (!layerWanted(name, index)) {
      img.hidden = true;
      return;
    }
    const url = fill(info.urls[name], index);
    if (img.getAttribute("src") !== url) {
      img.hidden = true; // never show one slice's overlay over another slice
      img.setAttribute("src", url);
    } else if (img.complete && img.naturalWidth) {
      img.hidden = false;
    }
  }

  function describe(index) {
    const s = info.slices[index];
    const parts = [];
    if (s.score !== null) {
      const above = info.threshold !== null && s.score > info.threshold;
      parts.push(`score ${s.score.toFixed(4)}${above ? " (above the threshold)" : ""}`);
    }
    if (s.position !== null) parts.push(`at ${s.position.toFixed(1)} mm`);
    if (s.residual) parts.push("heat map");
    if (s.contour) parts.push("liver");
    return parts.join(" · ");
  }

  function show() {
    const index = state.index;
    indexOut.textContent = String(index);
    slider.value = String(index);
    $("#viewer-score").textContent = describe(index);
    const url = sliceUrl(index);
    if (layers.slice.getAttribute("src") !== url) {
      layers.slice.dataset.index = String(index);
      layers.slice.setAttribute("src", url);
    }
    setLayer("residual", index);
    setLayer("contour", index);
    moveCursor(index);
    prefetch(index);
  }

  function prefetch(index) {
    for (let d = 1; d <= PREFETCH; d++) {
      for (const i of [index + d, index - d]) {
        if (i < 0 || i > last) continue;
        const urls = [sliceUrl(i)];
        for (const name of ["residual", "contour"]) if (layerWanted(name, i)) urls.push(fill(info.urls[name], i));
        for (const url of urls) {
          if (prefetched.has(url)) continue;
          const image = new Image();
          image.src = url;
          prefetched.set(url, image);
        }
      }
    }
    while (prefetched.size > PREFETCH_KEEP) prefetched.delete(prefetched.keys().next().value);
  }

  layers.slice.addEventListener("load", () => {
    root.dataset.loaded = layers.slice.dataset.index;
    report(root, "");
  });
  for (const name of ["residual", "contour"]) {
    layers[name].addEventListener("load", () => {
      layers[name].hidden = !layerWanted(name, state.index);
    });
    layers[name].addEventListener("error", () => report(root, `The ${name} layer of slice ${state.index} failed to load.`));
  }
  layers.slice.addEventListener("error", () => report(root, `Slice ${state.index} failed to load.`));

  function go(index) {
    const next = Math.max(0, Math.min(last, Math.round(index)));
    if (next === state.index) return;
    state.index = next;
    show();
  }

  function setWindow(level, width) {
    state.level = Math.max(-4000, Math.min(4000, Number(level)));
    state.width = Math.max(1, Math.min(8000, Number(width)));
    levelIn.value = formatNumber(state.level);
    widthIn.value = formatNumber(state.width);
    for (const button of presets.querySelectorAll("button")) {
      const preset = info.presets[button.dataset.preset];
      button.classList.toggle("active", preset.level === state.level && preset.width === state.width);
    }
    show();
  }

  // --- input ---
  stage.addEventListener(
    "wheel",
    (event) => {
      if (event.deltaY === 0) return;
      event.preventDefault();
      go(state.index + Math.sign(event.deltaY));
    },
    { passive: false },
  );
  root.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target instanceof HTMLInputElement && target.type !== "checkbox") return; // the slider and W/L fields
    const steps = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
    if (event.key in steps) go(state.index + steps[event.key]);
    else if (event.key === "Home") go(0);
    else if (event.key === "End") go(last);
    else return;
    event.preventDefault();
  });
  slider.addEventListener("input", () => go(Number(slider.value)));
  $("form.viewer-window").addEventListener("submit", (event) => {
    event.preventDefault();
    if (levelIn.value !== "" && widthIn.value !== "") setWindow(levelIn.value, widthIn.value);
  });
  for (const input of [levelIn, widthIn]) {
    input.addEventListener("change", () => {
      if (levelIn.value !== "" && widthIn.value !== "") setWindow(levelIn.value, widthIn.value);
    });
  }

  // --- the score plot: a click jumps to the nearest slice; a cursor marks the shown one ---
  const plot = document.querySelector("svg.score-plot");
  let cursor = null;
  if (plot && plot.dataset.first !== undefined) {
    const first = Number(plot.dataset.first);
    const lastPlotted = Number(plot.dataset.last);
    const x0 = Number(plot.dataset.x0);
    const x1 = Number(plot.dataset.x1);
    cursor = document.createElementNS("http://www.w3.org/2000/svg", "line");
    cursor.classList.add("viewer-cursor");
    cursor.setAttribute("y1", plot.dataset.y0);
    cursor.setAttribute("y2", plot.dataset.y1);
    plot.append(cursor);
    cursor.dataset.first = String(first);
    cursor.dataset.scale = String(lastPlotted > first ? (x1 - x0) / (lastPlotted - first) : 0);
    cursor.dataset.x0 = String(x0);
    plot.classList.add("clickable");
    plot.addEventListener("click", (event) => {
      event.preventDefault(); // the top slices' points link to their picture further down
      const point = event.target.closest("[data-index]");
      if (point && point !== plot) {
        go(Number(point.dataset.index));
      } else {
        const matrix = plot.getScreenCTM();
        if (!matrix) return;
        const p = new DOMPoint(event.clientX, event.clientY).matrixTransform(matrix.inverse());
        const scale = Number(cursor.dataset.scale);
        go(scale ? first + (p.x - x0) / scale : first);
      }
      stage.focus({ preventScroll: true });
    });
  }

  function moveCursor(index) {
    if (!cursor) return;
    const x = Number(cursor.dataset.x0) + (index - Number(cursor.dataset.first)) * Number(cursor.dataset.scale);
    cursor.setAttribute("x1", x.toFixed(1));
    cursor.setAttribute("x2", x.toFixed(1));
  }

  $(".viewer-body").hidden = false;
  setWindow(state.level, state.width); // fills the W/L fields, marks the preset and shows the first slice
  show();
  root.dataset.ready = "true";
}
