// A reward model's learning curve on its model page: validation accuracy of the probes
// against training rankings, the fine-tuned model's accuracy, and the labelers' agreement
// as a dashed line (data from #learning-curve-data).

function drawLearningCurve() {
  const source = document.getElementById("learning-curve-data");
  const canvas = document.getElementById("learning-curve");
  if (!source || !canvas || !window.Chart) return;
  const data = JSON.parse(source.textContent);
  const xs = data.points.map((p) => p.rankings).concat([data.final.rankings]);
  const datasets = [
    { label: "probe", data: data.points.map((p) => ({ x: p.rankings, y: p.val_accuracy })), borderColor: "#2f5bd3", backgroundColor: "#2f5bd3" },
    { label: "fine-tuned", data: [{ x: data.final.rankings, y: data.final.val_accuracy }], borderColor: "#1a7f37", backgroundColor: "#1a7f37", pointRadius: 5, showLine: false },
  ];
  if (data.agreement !== null && data.agreement !== undefined) {
    datasets.push({ label: "labelers' agreement", data: [{ x: Math.min(...xs), y: data.agreement }, { x: Math.max(...xs), y: data.agreement }],
      borderColor: "#b35900", borderDash: [6, 4], pointRadius: 0 });
  }
  new Chart(canvas, {
    type: "line",
    data: { datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      parsing: false,
      scales: { x: { type: "linear", title: { display: true, text: "training rankings" }, ticks: { precision: 0 } },
                y: { suggestedMin: 0.5, suggestedMax: 1, title: { display: true, text: "validation accuracy" } } },
    },
  });
}

document.addEventListener("DOMContentLoaded", drawLearningCurve);
