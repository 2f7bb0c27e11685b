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
