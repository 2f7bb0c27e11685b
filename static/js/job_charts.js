// Live curves on a job's page: one small line chart per metric, fed by
// /api/v1/jobs/{id}/metrics. Polls for values written since the last one it has
// while the job is queued or running (#job-status data-status); once it has finished, reloads them
// all and stops (then the section's data-complete is "true").
// Each canvas's data-points attribute says how many points it draws.

const POLL_MS = 2000;
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

function jobStatus() {
  return document.getElementById("job-status")?.dataset.status ?? "succeeded";
}

function chartFor(grid, charts, name) {
  if (charts.has(name)) return charts.get(name);
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = name;
  const box = document.createElement("div");
  box.style.height = "180px";
  const canvas = document.createElement("canvas");
  canvas.dataset.metric = name;
  canvas.dataset.points = "0";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `${name} by step`);
  box.appendChild(canvas);
  figure.append(caption, box);
  // Keep the charts in name order so they do not jump around between polls.
  const after = Array.from(grid.children).find((f) => f.querySelector("canvas").dataset.metric > name);
  grid.insertBefore(figure, after ?? null);
  const chart = new Chart(canvas, {
    type: "line",
    data: { datasets: [{ label: name, data: [], borderColor: "#2f5bd3", backgroundColor: "#2f5bd3", pointRadius: 1.5, borderWidth: 1.5 }] },
    options: {
      animation: false,
      maintainAspectRatio: false,
      parsing: false,
      plugins: { legend: { display: false } },
      scales: { x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } } },
    },
  });
  charts.set(name, chart);
  return chart;
}

function addPoints(section, charts, metrics) {
  const grid = section.querySelector(".job-charts");
  const touched = new Set();
  for (const m of metrics) {
    const chart = chartFor(grid, charts, m.name);
    const data = chart.data.datasets[0].data;
    const existing = data.findIndex((p) => p.x === m.step);
    if (existing >= 0) data[existing] = { x: m.step, y: m.value };
    else data.push({ x: m.step, y: m.value });
    touched.add(chart);
  }
  for (const chart of touched) {
    chart.data.datasets[0].data.sort((a, b) => a.x - b.x);
    chart.update("none");
    chart.canvas.dataset.points = String(chart.data.datasets[0].data.length);
  }
  const empty = section.querySelector("[data-empty]");
  if (empty) empty.hidden = charts.size > 0;
}

function startJobCharts() {
  const section = document.getElementById("job-charts");
  if (!section || !window.Chart) return;
  const url = section.dataset.metricsUrl;
  const charts = new Map();
  let lastId = null;
  async function poll() {
    // Once the job has finished, one last poll reloads every value: a value committed after a
    // later-numbered one (two writers) would otherwise never be fetched by after_id.
    const final = FINISHED.has(jobStatus());
    let fetched = false;
    try {
      const query = final || lastId === null ? "" : `?after_id=${lastId}`;
      const response = await fetch(url + query, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const metrics = await response.json();
        if (final) for (const chart of charts.values()) chart.data.datasets[0].data = [];
        if (metrics.length) {
          lastId = Math.max(lastId ?? 0, ...metrics.map((m) => m.id));
          addPoints(section, charts, metrics);
        }
        fetched = true;
      }
    } catch (error) {
      // A failed poll is retried at the next tick.
    }
    section.dataset.lastId = String(lastId ?? "");
    if (final && fetched) section.dataset.complete = "true";
    else setTimeout(poll, POLL_MS);
  }
  poll();
}

document.addEventListener("DOMContentLoaded", startJobCharts);
