// The writing page: a textarea that grows, live character/word counts, Ctrl+Enter to
// submit, and a last save of the draft when the tab is hidden or closed (the server
// also gets it every few seconds through htmx, see _demonstration_editor.html).
(() => {
  const autosize = (area) => {
    if (CSS.supports("field-sizing", "content")) return;
    area.style.height = "auto";
    area.style.height = `${area.scrollHeight + 2}px`;
  };
  const count = (area) => {
    const out = document.getElementById("demo-count");
    if (!out) return;
    const text = area.value;
    const words = text.trim() ? text.trim().split(/\s+/).length : 0;
    out.textContent = `${text.length} characters · ${words} words`;
  };
  const saveNow = () => {
    const form = document.getElementById("demo-form");
    const area = document.getElementById("demo-text");
    if (!form || !area || area.dataset.sent === area.value) return;
    const url = area.getAttribute("hx-post");
    // sendBeacon survives the tab closing; the form carries its CSRF token.
    if (navigator.sendBeacon(url, new FormData(form))) area.dataset.sent = area.value;
  };
  htmx.onLoad((root) => {
    const area = root.querySelector ? root.querySelector("#demo-text") : null;
    if (!area) return;
    autosize(area);
    count(area);
    area.addEventListener("input", () => { autosize(area); count(area); delete area.dataset.sent; });
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        document.getElementById("demo-submit")?.click();
      }
    });
  });
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") saveNow(); });
  window.addEventListener("pagehide", saveNow);
})();
