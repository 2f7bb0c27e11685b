// The quality page: sort the labeler table by a column, draw labels per hour.

function cellValue(row, index, numeric) {
  const cell = row.cells[index];
  const raw = cell?.dataset.value ?? cell?.textContent.trim() ?? "";
  return numeric ? parseFloat(raw) : raw.toLowerCase();
}

function sortTable(th) {
  const table = th.closest("table");
  const index = Array.from(th.parentNode.children).indexOf(th);
  const numeric = th.dataset.sort === "num";
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  table.querySelectorAll("th[aria-sort]").forEach((other) => other.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
    const order = x < y ? -1 : x > y ? 1 : 0;
    return ascending ? order : -order;
  });
  rows.forEach((row) => body.appendChild(row));
}

document.addEventListener("click", (event) => {
  const th = event.target.closest("table[data-sortable] th[data-sort]");
  if (th) sortTable(th);
});

function drawLabelsPerHour() {
  const source = document.getElementById("labels-per-hour-data");
  const canvas = document.getElementById("labels-per-hour");
  if (!source || !canvas || !window.Chart) return;
  const data = JSON.parse(source.textContent);
  new Chart(canvas, {
    type: "bar",
    data: { labels: data.labels, datasets: [{ label: "labels per hour", data: data.values, backgroundColor: "#2f5bd3" }] },
    options: {
      animation: false,
      maintainAspectRatio: false,
      plugins: { legend: { display: false } },
      scales: { y: { beginAtZero: true, ticks: { precision: 0 } }, x: { ticks: { maxTicksLimit: 12 } } },
    },
  });
}

document.addEventListener("DOMContentLoaded", drawLabelsPerHour);
