// statehub UI: the only script. Copy buttons and expand/collapse-all for the tensor groups;
// every page works without it (groups are <details>, values are selectable text).
"use strict";

document.documentElement.classList.add("js");

document.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.dataset.copy !== undefined) {
    copy(button, button.dataset.copy);
  } else if (button.dataset.details) {
    const open = button.dataset.details === "open";
    for (const group of document.querySelectorAll("details.group")) group.open = open;
  }
});

function copy(button, text) {
  const done = () => {
    button.classList.add("copied");
    const label = button.textContent;
    button.textContent = "copied";
    setTimeout(() => { button.textContent = label; button.classList.remove("copied"); }, 1200);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => {});
    return;
  }
  // Plain http (not localhost): the Clipboard API is unavailable; fall back to a selection.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  try { if (document.execCommand("copy")) done(); } finally { area.remove(); }
}
