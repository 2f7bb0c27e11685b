// Small page-wide behaviour. Feature scripts live beside the partial that needs them.
document.addEventListener("htmx:responseError", (event) => {
  // Errors that htmx does not swap (403, 404, 500...) still reach the user.
  const box = document.getElementById("errors");
  if (!box) return;
  const xhr = event.detail.xhr;
  if (xhr.getResponseHeader("content-type")?.startsWith("text/html")) {
    const doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
    const alert = doc.querySelector("[role=alert]");
    box.innerHTML = alert ? alert.outerHTML : "";
  }
  if (!box.innerHTML) box.textContent = `Request failed (${xhr.status}). Reload the page and try again.`;
});

// Bar sizes come as data-width / data-height (percent): the Content-Security-Policy
// blocks style attributes in the HTML, not styles set from a script.
htmx.onLoad((root) => {
  for (const el of [root, ...root.querySelectorAll("[data-width], [data-height]")]) {
    if (el.dataset?.width !== undefined) el.style.width = `${el.dataset.width}%`;
    if (el.dataset?.height !== undefined) el.style.height = `${el.dataset.height}%`;
  }
});

// A form with data-confirm asks first (the CSP blocks inline onsubmit handlers).
document.addEventListener("submit", (event) => {
  const message = event.target.dataset?.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});
